"""`ModelConfig`: every architecture and loss hyper-parameter of XKD, with the paper's values as defaults.

Implements the numbers of the method sheet (`../shared/xkd-method.md` sections 1.1-1.6, 2.2, 2.5-2.7 and the
decisions at its top): view geometry and tokenisation, ViT-B encoders, 384x4 decoders, the
`2048-gelu-3-256-8192-norm3` projector head, mask ratios, temperatures, centering, the MMD bandwidths, the loss
coefficients, the modality-agnostic variants (MAS / MATS) and the ablations. Size presets come from
`ModelConfig.from_name` over the `PRESETS` table; every other field is an override.

`variant` itself only selects the block sharing. The paper's other MAS/MATS values (3 video local views, teacher
temperatures 0.09 -> 0.11 video and 0.04 -> 0.06 audio, `VARIANT_DEFAULTS`) are applied by `from_name` together with
the variant; the dataclass defaults are XKD's. A config assembled field by field (YAML, CLI) states them itself:
no field's default depends on another field, because a parser that instantiates the defaults first (jsonargparse
does) would otherwise silently keep XKD's values under `variant: mas`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

Modality = Literal["video", "audio"]
MODALITIES: tuple[Modality, ...] = ("video", "audio")

# Size presets (litgpt-style table of named dicts). `base` is the paper's ViT-B; `small` a ViT-S with a
# VideoMAE-S-sized decoder for quicker experiments; `tiny` the test geometry of the house style.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "decoder_dim": 192, "decoder_heads": 3},
    "tiny": {
        "video_frames": 8,
        "video_size": 32,
        "video_local_frames": 4,
        "video_local_size": 16,
        "tubelet_frames": 2,
        "patch_size": 8,
        "audio_mels": 16,
        "audio_frames": 32,
        "audio_local_frames": 16,
        "audio_patch_mels": 4,
        "audio_patch_frames": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 16,
        "head_out_dim": 64,
    },
}

# Paper values that differ between XKD and the modality-agnostic variants (method sheet 1.6 and 2.5), applied by
# `ModelConfig.from_name`; the dataclass defaults equal the "xkd" row.
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "xkd": {
        "video_local_views": 1,
        "audio_local_views": 1,
        "teacher_temp_video_start": 0.1,
        "teacher_temp_video_end": 0.1,
        "teacher_temp_audio_start": 0.07,
        "teacher_temp_audio_end": 0.07,
    },
    "mas": {
        "video_local_views": 3,
        "audio_local_views": 1,
        "teacher_temp_video_start": 0.09,
        "teacher_temp_video_end": 0.11,
        "teacher_temp_audio_start": 0.04,
        "teacher_temp_audio_end": 0.06,
    },
}
VARIANT_DEFAULTS["mats"] = VARIANT_DEFAULTS["mas"]


def keep_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept visible by random masking: round(N (1 - r)), half rounded up (59 of 392 at 0.85, 112 of 560
    at 0.80). The small epsilon absorbs float error such as 560 * 0.2 = 111.99999999999999."""
    return math.floor(num_tokens * (1.0 - mask_ratio) + 0.5 + 1e-9)


@dataclass
class ModelConfig:
    # ---- view geometry and tokenisation (method sheet 1.1) ----
    video_frames: int = 32
    """Frames in the global video view (4 s at 8 fps)."""
    video_size: int = 112
    """Height and width in pixels of the global video view."""
    video_local_frames: int = 8
    """Frames in a local video view (1 s, contiguous)."""
    video_local_size: int = 96
    """Height and width in pixels of a local video view."""
    video_channels: int = 3
    """Colour channels of the video input."""
    tubelet_frames: int = 4
    """Temporal extent of a video tubelet (frames)."""
    patch_size: int = 16
    """Spatial extent (pixels, square) of a video tubelet."""
    audio_mels: int = 80
    """Mel bins of the log-mel input; every audio view must have exactly this many."""
    audio_frames: int = 448
    """Mel frames of the global audio view (4 s at hop 143)."""
    audio_local_frames: int = 112
    """Mel frames of a local audio view (1 s)."""
    audio_patch_mels: int = 4
    """Frequency extent (mel bins) of an audio patch."""
    audio_patch_frames: int = 16
    """Time extent (mel frames) of an audio patch."""
    video_local_views: int = 1
    """Local video views per sample fed to the student (XKD 1; MAS/MATS 3 via `from_name`)."""
    audio_local_views: int = 1
    """Local audio views per sample fed to the student (1 in every variant)."""

    # ---- encoders (method sheet 1.2) ----
    embed_dim: int = 768
    """Width of the ViT encoders (students and teachers)."""
    depth: int = 12
    """Transformer blocks per encoder."""
    num_heads: int = 12
    """Attention heads per encoder block."""
    mlp_ratio: float = 4.0
    """Hidden width of the block MLPs as a multiple of the block width."""
    qkv_bias: bool = False
    """Bias on the fused qkv projection (False in XKD, True in MAE)."""
    attention: Literal["sdpa", "explicit"] = "sdpa"
    """Attention kernel: `sdpa` (torch scaled_dot_product_attention) or `explicit` (softmax(QK^T)V written out,
    for checking). The teacher's last-layer CLS attention is always computed explicitly, as it is an output."""

    # ---- masked reconstruction (method sheet 1.3, 2.2) ----
    video_mask_ratio: float = 0.85
    """Fraction of video tokens masked in the reconstruction branch."""
    audio_mask_ratio: float = 0.80
    """Fraction of audio tokens masked in the reconstruction branch."""
    decoder_dim: int = 384
    """Width of the reconstruction decoders."""
    decoder_depth: int = 4
    """Transformer blocks per decoder."""
    decoder_heads: int = 12
    """Attention heads per decoder block."""
    norm_pix_loss: bool = True
    """Normalise each target patch by its own mean and unbiased std (MAE `norm_pix_loss`)."""

    # ---- projector heads (method sheet 1.4) ----
    head_hidden_dim: int = 2048
    """Hidden width of the projector MLP."""
    head_layers: int = 3
    """Linear layers in the projector MLP (the last one maps to the bottleneck)."""
    head_bottleneck_dim: int = 256
    """Width of the L2-normalised bottleneck before the weight-normalised prototype layer."""
    head_out_dim: int = 8192
    """Number of prototypes (head output width, K)."""

    # ---- cross-modal distillation (method sheet 2.4, 2.5) ----
    student_temp: float = 0.1
    """Student softmax temperature (both directions)."""
    teacher_temp_video_start: float = 0.1
    """Video-teacher temperature at the start of the warmup (XKD 0.1; MAS/MATS 0.09 via `from_name`). The
    schedule is computed by the trainer, which passes the current value to `XKDTeacher.forward`."""
    teacher_temp_video_end: float = 0.1
    """Video-teacher temperature after the warmup (XKD 0.1; MAS/MATS 0.11 via `from_name`)."""
    teacher_temp_audio_start: float = 0.07
    """Audio-teacher temperature at the start of the warmup (XKD 0.07; MAS/MATS 0.04 via `from_name`)."""
    teacher_temp_audio_end: float = 0.07
    """Audio-teacher temperature after the warmup (XKD 0.07; MAS/MATS 0.06 via `from_name`)."""
    center_momentum: float = 0.9
    """EMA momentum of the DINO centers (one per direction)."""
    teacher_temp_relative: bool = False
    """Scale each teacher temperature by the spread of that teacher's outputs across clips (`losses.output_spread`)
    over their spread at the first step: the targets keep the sharpness they start with as the heads' outputs draw
    together. Not in the paper: a demo-scale remedy (docs/ablation.md, "Why" 3 and 6), where the paper's fixed
    temperatures turn the targets uniform once the spread has shrunk ~10x."""
    refine: bool = True
    """Re-weight the teacher's patch tokens by cross-modal CLS attention before pooling (method sheet 2.4); off:
    plain mean pooling."""
    refine_mode: Literal["mean", "softmax"] = "mean"
    """Cross-modal attention mode of the refinement: `mean` (released default) or `softmax` (near no-op)."""
    teacher_input: Literal["global", "local"] = "global"
    """Teacher input: the unmasked, time-aligned global views (paper intent, decision 1) or local view 0 of each
    modality (the released code's behaviour)."""
    oracle_targets: bool = False
    """Control experiment: replace the audio teacher's targets for the video student by one-hot labels over the
    first `oracle_num_classes` prototypes (needs `labels` in `XKD.forward`)."""
    oracle_num_classes: int = 0
    """Number of classes of the oracle labels (required when `oracle_targets`)."""

    # ---- domain alignment (method sheet 2.6) ----
    mmd_gammas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    """Bandwidths gamma of the multi-kernel Gaussian MMD, k(x, y) = sum_gamma exp(-gamma ||x - y||^2)."""

    # ---- loss combination (method sheet 2.7) ----
    recon_coeff: float = 5.0
    """Weight of L_recon (mean of the modalities' reconstruction losses)."""
    kd_coeff: float = 1.0
    """Weight of L_kd (mean of the two KD directions)."""
    kd_v2a_weight: float = 1.0
    """Weight of the video-teacher -> audio-student direction inside L_kd = (L_a2v + w L_v2a) / (1 + w); the paper
    (1) averages both. 0 distils audio -> video only, a demo-scale control (docs/ablation.md): an uninformative
    video teacher then cannot pull the audio head toward a constant."""
    da_coeff: float = 1.0
    """Weight of L_da (domain alignment)."""

    # ---- what is built (method sheet 1.6 and decision 7) ----
    variant: Literal["xkd", "mas", "mats"] = "xkd"
    """Backbone sharing: `xkd` separate per modality; `mas` one student block stack shared by both modalities;
    `mats` shared student blocks and one shared teacher block stack."""
    objective: Literal["mr", "mr_video", "mr_kd", "mr_da", "full"] = "full"
    """Loss terms: `mr` masked reconstruction of both modalities; `mr_video` video reconstruction alone; `mr_kd`
    and `mr_da` add cross-modal KD or domain alignment; `full` is XKD (all three). Only used modules are built."""

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset `name` ("tiny", "small", "base"), then the paper's values of `overrides["variant"]`
        (default "xkd", `VARIANT_DEFAULTS`), then `overrides`."""
        if name not in PRESETS:
            raise ValueError(
                f"ModelConfig.from_name: unknown preset {name!r}; choose one of {sorted(PRESETS)}"
            )
        variant = overrides.get("variant", "xkd")
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"ModelConfig.variant={variant!r}: choose 'xkd', 'mas' or 'mats'")
        return cls(**{**PRESETS[name], **VARIANT_DEFAULTS[variant], **overrides})

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_DEFAULTS:
            raise ValueError(f"ModelConfig.variant={self.variant!r}: choose 'xkd', 'mas' or 'mats'")
        # YAML and CLI round trips give lists; the dataclass holds a tuple.
        self.mmd_gammas = tuple(float(g) for g in self.mmd_gammas)
        self._check()
        self._warn_xkd_values_under_shared_variant()

    def _warn_xkd_values_under_shared_variant(self) -> None:
        # `--model.variant mas` on the command line keeps the other fields' XKD defaults (see the module
        # docstring); say so instead of silently training a half-MAS model.
        if self.variant == "xkd":
            return
        kept = [
            k
            for k, v in VARIANT_DEFAULTS["xkd"].items()
            if getattr(self, k) == v and VARIANT_DEFAULTS[self.variant][k] != v
        ]
        if kept:
            paper = {k: VARIANT_DEFAULTS[self.variant][k] for k in kept}
            warnings.warn(
                f"ModelConfig: variant={self.variant!r} but {kept} keep XKD's values; the paper's {self.variant} "
                f"values are {paper} (set them, as configs/xkd_{self.variant}_k400.yaml does, or use from_name)",
                stacklevel=2,
            )

    def _check(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"ModelConfig: {msg}")

        if self.objective not in ("mr", "mr_video", "mr_kd", "mr_da", "full"):
            fail(f"objective={self.objective!r}: choose 'mr', 'mr_video', 'mr_kd', 'mr_da' or 'full'")
        if self.attention not in ("sdpa", "explicit"):
            fail(f"attention={self.attention!r}: choose 'sdpa' or 'explicit'")
        if self.refine_mode not in ("mean", "softmax"):
            fail(f"refine_mode={self.refine_mode!r}: choose 'mean' or 'softmax'")
        if self.teacher_input not in ("global", "local"):
            fail(f"teacher_input={self.teacher_input!r}: choose 'global' or 'local'")
        for frames, size, kind in (
            (self.video_frames, self.video_size, "video_frames/video_size"),
            (self.video_local_frames, self.video_local_size, "video_local_frames/video_local_size"),
        ):
            if frames % self.tubelet_frames or size % self.patch_size:
                fail(
                    f"{kind}=({frames}, {size}) must be multiples of tubelet_frames={self.tubelet_frames} and "
                    f"patch_size={self.patch_size}"
                )
        if self.audio_mels % self.audio_patch_mels:
            fail(
                f"audio_mels={self.audio_mels} must be a multiple of audio_patch_mels={self.audio_patch_mels}"
            )
        for name in ("audio_frames", "audio_local_frames"):
            if getattr(self, name) % self.audio_patch_frames:
                fail(
                    f"{name}={getattr(self, name)} must be a multiple of audio_patch_frames={self.audio_patch_frames}"
                )
        for dim, heads, kind in (
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (self.decoder_dim, self.decoder_heads, "decoder_dim/decoder_heads"),
        ):
            if dim % heads:
                fail(f"{kind}=({dim}, {heads}): the width must be divisible by the number of heads")
        for name in ("video_local_views", "audio_local_views"):
            if getattr(self, name) < 0:
                fail(f"{name}={getattr(self, name)} must be >= 0")
        for name, tokens in (
            ("video_mask_ratio", self.video_tokens),
            ("audio_mask_ratio", self.audio_tokens),
        ):
            ratio = getattr(self, name)
            if not 0.0 <= ratio < 1.0 or keep_count(tokens, ratio) < 1:
                fail(f"{name}={ratio} must be in [0, 1) and keep at least one of the {tokens} tokens")
        if self.head_layers < 2:
            fail(f"head_layers={self.head_layers} must be >= 2 (hidden layers then the bottleneck layer)")
        temps = [self.student_temp] + [
            getattr(self, f"teacher_temp_{m}_{e}") for m in MODALITIES for e in ("start", "end")
        ]
        if min(temps) <= 0:
            fail(f"temperatures must be > 0, got student_temp and teacher temps {temps}")
        if not 0.0 <= self.center_momentum <= 1.0:
            fail(f"center_momentum={self.center_momentum} must be in [0, 1]")
        if not self.mmd_gammas or min(self.mmd_gammas) <= 0:
            fail(f"mmd_gammas={self.mmd_gammas} must be a non-empty tuple of positive bandwidths")
        if self.objective == "mr_video" and self.variant != "xkd":
            fail(
                f"variant={self.variant!r} shares blocks across modalities, but objective='mr_video' builds video only"
            )
        if self.variant == "mats" and not self.uses_teacher:
            fail(
                f"variant='mats' shares teacher blocks, but objective={self.objective!r} builds no teacher; "
                "use variant='mas' for a shared student without teachers"
            )
        if (
            self.teacher_input == "local"
            and self.uses_teacher
            and min(self.video_local_views, self.audio_local_views) < 1
        ):
            fail("teacher_input='local' feeds local view 0 to the teachers: set video/audio_local_views >= 1")
        if self.oracle_targets and not (self.uses_kd and 1 <= self.oracle_num_classes <= self.head_out_dim):
            fail(
                f"oracle_targets needs a KD objective ('mr_kd' or 'full', got {self.objective!r}) and "
                f"1 <= oracle_num_classes ({self.oracle_num_classes}) <= head_out_dim ({self.head_out_dim})"
            )
        if (
            min(self.recon_coeff, self.kd_coeff, self.da_coeff, self.kd_v2a_weight) < 0
            or self.recon_coeff == 0
        ):
            fail("loss coefficients must be >= 0 and recon_coeff > 0 (every objective reconstructs)")

    # ---- what the objective uses ----
    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Modalities with a student (and decoder): video only for `mr_video`, else both."""
        return ("video",) if self.objective == "mr_video" else MODALITIES

    @property
    def uses_kd(self) -> bool:
        """Cross-modal distillation is part of the loss."""
        return self.objective in ("mr_kd", "full")

    @property
    def uses_da(self) -> bool:
        """Domain alignment (MMD between the students' head outputs) is part of the loss."""
        return self.objective in ("mr_da", "full")

    @property
    def uses_teacher(self) -> bool:
        """EMA teachers are built (only KD needs them)."""
        return self.uses_kd

    @property
    def uses_heads(self) -> bool:
        """Student projector heads are built (KD or DA)."""
        return self.uses_kd or self.uses_da

    # ---- derived geometry ----
    @property
    def video_patch(self) -> tuple[int, int, int]:
        """Tubelet (t, h, w)."""
        return (self.tubelet_frames, self.patch_size, self.patch_size)

    @property
    def audio_patch(self) -> tuple[int, int]:
        """Audio patch (freq, time)."""
        return (self.audio_patch_mels, self.audio_patch_frames)

    @property
    def video_grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w) of the global video view: (8, 7, 7) for the paper."""
        p = self.patch_size
        return (self.video_frames // self.tubelet_frames, self.video_size // p, self.video_size // p)

    @property
    def audio_grid(self) -> tuple[int, int]:
        """Token grid (freq, time) of the global audio view: (20, 28) for the paper."""
        return (self.audio_mels // self.audio_patch_mels, self.audio_frames // self.audio_patch_frames)

    @property
    def video_tokens(self) -> int:
        """Patch tokens of the global video view (392 for the paper)."""
        return math.prod(self.video_grid)

    @property
    def audio_tokens(self) -> int:
        """Patch tokens of the global audio view (560 for the paper)."""
        return math.prod(self.audio_grid)

    def patch(self, modality: Modality) -> tuple[int, ...]:
        """Patch extent per spatial axis of `modality`."""
        return self.video_patch if modality == "video" else self.audio_patch

    def grid(self, modality: Modality) -> tuple[int, ...]:
        """Token grid of the global view of `modality` (the grid the positional embeddings are sized for)."""
        return self.video_grid if modality == "video" else self.audio_grid

    def in_chans(self, modality: Modality) -> int:
        """Input channels of `modality`."""
        return self.video_channels if modality == "video" else 1

    def mask_ratio(self, modality: Modality) -> float:
        """Mask ratio of the reconstruction branch of `modality`."""
        return self.video_mask_ratio if modality == "video" else self.audio_mask_ratio

    def local_views(self, modality: Modality) -> int:
        """Local views per sample of `modality`."""
        return self.video_local_views if modality == "video" else self.audio_local_views
