"""Analytic training FLOPs per sample of an XKD config, for model-FLOPs utilisation (MFU).

Counts the matrix multiplications only (2 FLOPs per multiply-add): patch embeddings, qkv/proj/MLP linears,
the two attention products (QK^T and AV), the decoder projections and the heads. Softmax, LayerNorm, GELU,
the losses and the MMD are left out (a fraction of a percent). Students and decoders count forward + backward as
3x forward (the usual 1 forward + 2 backward); teachers count forward only. Views per the method sheet 2.1-2.4: the
masked global view through the student encoder (patch embedding of all N tokens, blocks on the K visible + CLS),
the decoder on N + 1 tokens, every local view unmasked through the student, and one teacher pass per modality on
the view `cfg.teacher_input` selects.

For `base` at the paper's geometry (XKD, full objective, global teacher input) this gives 442.4 GFLOP per sample:
video student 75.4 + decoder 22.4 + teacher 74.3, audio student 133.4 + decoder 29.9 + teacher 107.0 (the audio
student is dearer: 112 visible + 140 local tokens against 59 + 72). The commonly quoted ~433 GFLOP is the same count
without the patch-embedding projections (8.7 GFLOP, almost all the 3072 -> 768 video tubelet projection):
433.7 GFLOP. Attention products are 30.5 GFLOP of the total, the heads 0.2. MAS/MATS (3 video local views) give
520.1; the release's local-view teacher input gives 298.8.
"""

from __future__ import annotations

import math

from xkd.model.config import Modality, ModelConfig, keep_count


def _patch_dim(cfg: ModelConfig, modality: Modality) -> int:
    return cfg.in_chans(modality) * math.prod(cfg.patch(modality))


def _block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one transformer block on `tokens` tokens: qkv + proj + MLP linears, QK^T and AV."""
    linear = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return linear + attention


def _encoder_flops(cfg: ModelConfig, modality: Modality, embedded: int, kept: int) -> float:
    """Forward FLOPs of an encoder that embeds `embedded` patches and runs its blocks on `kept` + CLS tokens."""
    return 2 * embedded * _patch_dim(cfg, modality) * cfg.embed_dim + cfg.depth * _block_flops(
        kept + 1, cfg.embed_dim, cfg.mlp_ratio
    )


def _decoder_flops(cfg: ModelConfig, modality: Modality, tokens: int, kept: int) -> float:
    """Forward FLOPs of a reconstruction decoder predicting `tokens` patches from `kept` visible tokens."""
    embed = 2 * (kept + 1) * cfg.embed_dim * cfg.decoder_dim
    blocks = cfg.decoder_depth * _block_flops(tokens + 1, cfg.decoder_dim, cfg.mlp_ratio)
    return embed + blocks + 2 * tokens * cfg.decoder_dim * _patch_dim(cfg, modality)


def _head_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of a projector head on one pooled vector."""
    hidden = cfg.embed_dim * cfg.head_hidden_dim + (cfg.head_layers - 2) * cfg.head_hidden_dim**2
    return 2 * (
        hidden + cfg.head_hidden_dim * cfg.head_bottleneck_dim + cfg.head_bottleneck_dim * cfg.head_out_dim
    )


def _local_tokens(cfg: ModelConfig, modality: Modality) -> int:
    if modality == "video":
        p = cfg.patch_size
        return (cfg.video_local_frames // cfg.tubelet_frames) * (cfg.video_local_size // p) ** 2
    return (cfg.audio_mels // cfg.audio_patch_mels) * (cfg.audio_local_frames // cfg.audio_patch_frames)


def flops_breakdown(cfg: ModelConfig) -> dict[str, float]:
    """Training FLOPs per sample by part: "student_<m>" and "decoder_<m>" (forward + backward), "teacher_<m>"
    (forward), for the modules `cfg` builds."""
    out = {}
    for m in cfg.modalities:
        n = cfg.video_tokens if m == "video" else cfg.audio_tokens
        kept = keep_count(n, cfg.mask_ratio(m))
        student = _encoder_flops(cfg, m, n, kept)
        if cfg.uses_heads:
            n_local, views = _local_tokens(cfg, m), cfg.local_views(m)
            student += views * _encoder_flops(cfg, m, n_local, n_local) + (1 + views) * _head_flops(cfg)
        out[f"student_{m}"] = 3 * student
        out[f"decoder_{m}"] = 3 * _decoder_flops(cfg, m, n, kept)
        if cfg.uses_teacher:
            n_teacher = n if cfg.teacher_input == "global" else _local_tokens(cfg, m)
            out[f"teacher_{m}"] = _encoder_flops(cfg, m, n_teacher, n_teacher) + _head_flops(cfg)
    return out


def flops_per_sample(cfg: ModelConfig) -> float:
    """Training FLOPs per sample (students + decoders forward and backward, teachers forward); see the module
    docstring for what is counted."""
    return sum(flops_breakdown(cfg).values())
