"""ModelConfig: paper defaults, presets, variant-resolved defaults, properties and cross-field checks."""

from __future__ import annotations

import dataclasses

import pytest

from xkd.model import ModelConfig
from xkd.model.config import keep_count


def test_base_defaults_are_the_paper_values() -> None:
    cfg = ModelConfig.from_name("base")
    assert cfg == ModelConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.qkv_bias) == (768, 12, 12, False)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (384, 4, 12)
    assert (cfg.head_hidden_dim, cfg.head_layers, cfg.head_bottleneck_dim, cfg.head_out_dim) == (
        2048,
        3,
        256,
        8192,
    )
    assert cfg.video_grid == (8, 7, 7) and cfg.video_tokens == 392
    assert cfg.audio_grid == (20, 28) and cfg.audio_tokens == 560
    assert (cfg.video_mask_ratio, cfg.audio_mask_ratio) == (0.85, 0.80)
    assert (cfg.recon_coeff, cfg.kd_coeff, cfg.da_coeff) == (5.0, 1.0, 1.0)
    assert cfg.teacher_input == "global" and cfg.refine and cfg.refine_mode == "mean"
    assert cfg.mmd_gammas == (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@pytest.mark.parametrize(
    ("variant", "local_views", "temps"),
    [
        ("xkd", (1, 1), (0.1, 0.1, 0.07, 0.07)),
        ("mas", (3, 1), (0.09, 0.11, 0.04, 0.06)),
        ("mats", (3, 1), (0.09, 0.11, 0.04, 0.06)),
    ],
)
def test_variant_defaults(variant: str, local_views: tuple[int, int], temps: tuple[float, ...]) -> None:
    cfg = ModelConfig.from_name("base", variant=variant)
    assert (cfg.video_local_views, cfg.audio_local_views) == local_views
    got = (
        cfg.teacher_temp_video_start,
        cfg.teacher_temp_video_end,
        cfg.teacher_temp_audio_start,
        cfg.teacher_temp_audio_end,
    )
    assert got == temps
    # Explicit values win over the variant table; the dataclass defaults are XKD's whatever the variant.
    assert ModelConfig.from_name("base", variant=variant, video_local_views=2).video_local_views == 2
    assert ModelConfig(variant=variant).video_local_views == 1


def test_asdict_round_trip_with_yaml_style_lists() -> None:
    cfg = ModelConfig.from_name("tiny", variant="mas", objective="mr_kd")
    mapping = dataclasses.asdict(cfg)
    mapping["mmd_gammas"] = list(mapping["mmd_gammas"])  # as YAML gives it back
    assert ModelConfig(**mapping) == cfg


@pytest.mark.parametrize(
    ("objective", "modalities", "kd", "da", "teacher"),
    [
        ("mr_video", ("video",), False, False, False),
        ("mr", ("video", "audio"), False, False, False),
        ("mr_kd", ("video", "audio"), True, False, True),
        ("mr_da", ("video", "audio"), False, True, False),
        ("full", ("video", "audio"), True, True, True),
    ],
)
def test_objective_properties(objective: str, modalities: tuple, kd: bool, da: bool, teacher: bool) -> None:
    cfg = ModelConfig.from_name("tiny", objective=objective)
    assert cfg.modalities == modalities
    assert (cfg.uses_kd, cfg.uses_da, cfg.uses_teacher, cfg.uses_heads) == (kd, da, teacher, kd or da)


def test_keep_count_rounds() -> None:
    assert keep_count(392, 0.85) == 59
    assert keep_count(560, 0.80) == 112
    assert keep_count(64, 0.85) == 10
    assert keep_count(10, 0.0) == 10


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "huge"}, "preset"),
        ({"video_size": 100}, "video_frames/video_size"),
        ({"audio_frames": 30}, "audio_frames"),
        ({"embed_dim": 33}, "embed_dim/num_heads"),
        ({"video_mask_ratio": 1.0}, "video_mask_ratio"),
        ({"variant": "mas", "objective": "mr_video"}, "mr_video"),
        ({"variant": "mats", "objective": "mr"}, "variant='mats'"),
        ({"teacher_input": "local", "video_local_views": 0}, "teacher_input='local'"),
        ({"oracle_targets": True}, "oracle_num_classes"),
        ({"oracle_targets": True, "oracle_num_classes": 5, "objective": "mr_da"}, "oracle_targets"),
        ({"student_temp": 0.0}, "temperatures"),
        ({"objective": "kd"}, "objective"),
        ({"variant": "shared"}, "variant"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict, field: str) -> None:
    name = overrides.pop("name", "tiny")
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_name(name, **overrides)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
@pytest.mark.parametrize("variant", ["xkd", "mas", "mats"])
def test_presets_are_valid(name: str, variant: str) -> None:
    cfg = ModelConfig.from_name(name, variant=variant)
    assert cfg.embed_dim % cfg.num_heads == 0 and cfg.video_tokens > 0 and cfg.audio_tokens > 0


def test_tiny_preset_is_the_house_test_geometry() -> None:
    cfg = ModelConfig.from_name("tiny")
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (2, 32, 2)
    assert (cfg.video_frames, cfg.video_size, cfg.video_local_frames, cfg.video_local_size) == (8, 32, 4, 16)
    assert cfg.video_patch == (2, 8, 8) and cfg.audio_mels == 16
    assert (cfg.video_tokens, cfg.audio_tokens) == (64, 16)
