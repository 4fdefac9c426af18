"""Encoder: token counts for every view size, parameter count, positional-embedding interpolation, the pooled
feature, SDPA vs explicit attention, and standalone `build_encoder` keys."""

from __future__ import annotations

import pytest
import torch

from xkd.model import XKD, ModelConfig, build_encoder


@pytest.fixture(scope="module")
def base_meta() -> dict[str, torch.nn.Module]:
    """The paper's ViT-B encoders on the meta device: shapes and parameter counts without memory or compute."""
    with torch.device("meta"):
        cfg = ModelConfig.from_name("base")
        return {m: build_encoder(cfg, m) for m in ("video", "audio")}


@pytest.mark.parametrize(
    ("modality", "shape", "tokens"),
    [
        ("video", (2, 3, 32, 112, 112), 392),  # global
        ("video", (2, 3, 8, 96, 96), 72),  # local
        ("video", (2, 3, 32, 224, 224), 1568),  # 224 px fine-tuning
        ("audio", (2, 1, 80, 448), 560),  # global
        ("audio", (2, 1, 80, 112), 140),  # local
        ("audio", (2, 1, 80, 1120), 1400),  # 10 s of audio
    ],
)
def test_base_token_counts(base_meta, modality: str, shape: tuple[int, ...], tokens: int) -> None:
    enc = base_meta[modality]
    with torch.device("meta"):
        x = torch.empty(shape)
        out, cls_attn = enc.forward_with_attention(x)
        assert out.shape == (2, 1 + tokens, 768)
        assert cls_attn.shape == (2, 12, tokens)
        assert enc.forward_features(x).shape == (2, 768)
        kept, mask, ids_restore = enc.forward_masked(x, 0.85 if modality == "video" else 0.80)
    assert kept.shape[1] - 1 == round(tokens * (0.15 if modality == "video" else 0.20))
    assert mask.shape == ids_restore.shape == (2, tokens)


def test_base_encoder_parameter_count(base_meta) -> None:
    video, audio = base_meta["video"], base_meta["audio"]
    n_video, n_audio = (sum(p.numel() for p in e.parameters()) for e in (video, audio))
    # 12 ViT-B blocks without qkv bias are 85.0M; plus the 3072 -> 768 tubelet projection (video) or 64 -> 768.
    assert n_video == 87_691_008 and n_audio == 85_509_888
    blocks = sum(p.numel() for p in video.blocks.parameters())
    assert 84e6 < blocks < 86e6


@pytest.mark.parametrize(
    ("modality", "shape", "tokens"),
    [
        ("video", (2, 3, 8, 32, 32), 64),
        ("video", (2, 3, 4, 16, 16), 8),
        ("video", (2, 3, 8, 64, 64), 256),
        ("audio", (2, 1, 16, 32), 16),
        ("audio", (2, 1, 16, 16), 8),
        ("audio", (2, 1, 16, 64), 32),
    ],
)
def test_tiny_shapes_and_pooled_feature(tiny, modality: str, shape: tuple[int, ...], tokens: int) -> None:
    enc = build_encoder(tiny(), modality)
    x = torch.randn(shape)
    out = enc(x)
    assert out.shape == (2, 1 + tokens, 32)
    torch.testing.assert_close(enc.forward_features(x), out[:, 1:].mean(1))
    tokens_att, cls_attn = enc.forward_with_attention(x)
    torch.testing.assert_close(tokens_att, out)
    assert cls_attn.shape == (2, 2, tokens) and bool((cls_attn.sum(-1) < 1).all())


def test_pos_embed_interpolation(tiny) -> None:
    enc = build_encoder(tiny(), "video")
    native = enc.patch_pos_embed(enc.grid)
    assert native.data_ptr() == enc.pos_embed[:, 1:].data_ptr()  # no interpolation at the native grid
    # Trilinear resize to twice the size and back is not the identity, but a constant field stays constant.
    with torch.no_grad():
        enc.pos_embed.fill_(0.5)
    assert torch.allclose(enc.patch_pos_embed((2, 6, 6)), torch.full((1, 72, 32), 0.5))

    audio = build_encoder(tiny(), "audio")
    pos = audio.pos_embed[:, 1:].reshape(4, 4, 32)
    # Time-only: doubling the length with bicubic keeps each frequency row independent of the others.
    longer = audio.patch_pos_embed((4, 8)).reshape(4, 8, 32)
    with torch.no_grad():
        audio.pos_embed[:, 1:].reshape(4, 4, 32)[1:] += 1.0
    assert torch.allclose(audio.patch_pos_embed((4, 8)).reshape(4, 8, 32)[0], longer[0])
    assert torch.equal(audio.patch_pos_embed((4, 4)).reshape(4, 4, 32)[0], pos[0])


def test_bad_inputs_raise(tiny) -> None:
    with pytest.raises(ValueError, match="audio_mels"):
        build_encoder(tiny(), "audio")(torch.randn(1, 1, 20, 32))
    with pytest.raises(ValueError, match="does not tile"):
        build_encoder(tiny(), "video")(torch.randn(1, 3, 8, 30, 32))
    with pytest.raises(ValueError, match="modality"):
        build_encoder(tiny(), "text")


def test_sdpa_and_explicit_encoders_agree(tiny) -> None:
    sdpa, explicit = build_encoder(tiny(), "video"), build_encoder(tiny(attention="explicit"), "video")
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(sdpa(x), explicit(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa.forward_with_attention(x)[1], explicit.forward_with_attention(x)[1])


@pytest.mark.parametrize("variant", ["xkd", "mas", "mats"])
def test_build_encoder_keys_match_the_student(tiny, variant: str) -> None:
    cfg = tiny(variant=variant)
    student = XKD(cfg)
    for modality, enc in student.encoders().items():
        standalone = build_encoder(cfg, modality)
        assert standalone.state_dict().keys() == enc.state_dict().keys()
        standalone.load_state_dict(enc.state_dict())
        x = torch.randn(2, 3, 8, 32, 32) if modality == "video" else torch.randn(2, 1, 16, 32)
        torch.testing.assert_close(standalone.forward_features(x), enc.forward_features(x))
