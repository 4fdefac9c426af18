"""Tests of `eval.py`: probes on synthetic features, fold handling, class subsets, feature averaging and caching,
export loading, and end-to-end runs on demo shards (paper section 5 protocols, `../shared/xkd-method.md`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
from xkd.model.config import ModelConfig
from xkd.pipeline.config import DataConfig
from xkd.sharding.schema import SampleMeta


# ---- synthetic features with a known linear structure ----------------------------------------------------------
def _synthetic(
    n_classes: int = 5,
    train_videos: int = 30,
    test_videos: int = 60,
    views: int = 3,
    dim: int = 24,
    seed: int = 0,
):
    """Class means on random directions plus noise: a bank (views per video) and clip-averaged test rows."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * 3.0

    def videos(n: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n * n_classes) % n_classes
        return labels, np.array([f"{prefix}{i:04d}" for i in range(len(labels))])

    y_videos, train_keys = videos(train_videos, "tr")
    rows = np.repeat(np.arange(len(y_videos)), views)
    x_bank = means[y_videos[rows]] + rng.normal(size=(len(rows), dim))
    y_test, _ = videos(test_videos, "te")
    x_test = means[y_test] + rng.normal(size=(len(y_test), dim))
    return x_bank.astype(np.float32), y_videos[rows], train_keys[rows], x_test.astype(np.float32), y_test


def _run_probe(name: str, x_bank, y_bank, groups, x_test, n_classes, select: bool = True):
    """One probe with a small grid; `select=False` gives the linear probe a single candidate (no CV: faster)."""
    if name == "svm":
        return ev.fit_svm(
            x_bank, y_bank, groups, x_test, n_classes=n_classes, costs=[0.01, 1.0], n_splits=3, max_iter=1000, seed=0
        )  # fmt: skip
    if name == "linear":
        return ev.fit_linear(
            x_bank, y_bank, groups, x_test, n_classes=n_classes, weight_decays=[0.0, 1e-3] if select else [1e-3],
            n_splits=3, epochs=10, lr=0.01, warmup_epochs=2, batch_size=128, seed=0,
        )  # fmt: skip
    _, first = np.unique(groups, return_index=True)  # kNN works on one row per video
    return ev.fit_knn(
        x_bank[first], y_bank[first], groups[first], x_test, n_classes=n_classes, ks=[5, 10], temperature=0.07
    )


@pytest.mark.parametrize("probe", ["svm", "linear", "knn"])
def test_probes_separate_linear_structure_and_fall_to_chance_on_shuffled_labels(probe: str) -> None:
    n_classes = 5
    x_bank, y_bank, groups, x_test, y_test = _synthetic(n_classes)
    out = _run_probe(probe, x_bank, y_bank, groups, x_test, n_classes)
    assert out.scores.shape == (len(y_test), n_classes)
    assert ev.topk_accuracy(out.scores, y_test, 1) > 0.97
    assert out.chosen and out.selection  # what was chosen, and every candidate's CV score, are reported

    # Labels shuffled per video (the views of one video keep one label): nothing to learn, test accuracy ~ 1/C.
    rng = np.random.default_rng(1)
    uniq, inverse = np.unique(groups, return_inverse=True)
    shuffled = rng.permutation(np.array([y_bank[groups == g][0] for g in uniq]))[inverse]
    shuffled_out = _run_probe(probe, x_bank, shuffled, groups, x_test, n_classes, select=False)
    assert abs(ev.topk_accuracy(shuffled_out.scores, y_test, 1) - 1 / n_classes) < 0.12


def test_linear_head_matches_autograd_and_torch_adamw() -> None:
    """The written-out gradient and AdamW step of `train_linear` equal autograd + torch.optim.AdamW."""
    torch.manual_seed(0)
    x, y = torch.randn(300, 16), torch.randint(0, 4, (300,))
    head = ev.train_linear(
        x, y, 4, epochs=3, lr=0.01, warmup_epochs=1, batch_size=64, weight_decay=0.01, seed=0
    )
    g = torch.Generator().manual_seed(0)  # the same draws: init, then one permutation per epoch
    ref = torch.nn.Linear(16, 4)
    with torch.no_grad():
        torch.nn.init.orthogonal_(ref.weight, generator=g)
        ref.bias.zero_()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.999), weight_decay=0.01)
    step = 0
    for _ in range(3):
        order = torch.randperm(300, generator=g)
        for i in range(5):
            rows = order[i * 64 : (i + 1) * 64]
            opt.param_groups[0]["lr"] = 0.01 * ev.warmup_cosine(step, 15, 5)
            loss = torch.nn.functional.cross_entropy(ref(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    torch.testing.assert_close(head.weight, ref.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.bias, ref.bias, atol=1e-6, rtol=1e-5)


def test_svm_release_protocol_selects_on_test_split() -> None:
    x_bank, y_bank, groups, x_test, y_test = _synthetic()
    out = ev.fit_svm(
        x_bank, y_bank, groups, x_test, n_classes=5, costs=[1e-4, 1.0], n_splits=3, max_iter=1000, seed=0,
        y_test=y_test,
    )  # fmt: skip
    # The selection table holds test accuracies; the chosen cost is the best of them.
    assert out.selection[f"C={out.chosen['C']:g}"] == max(out.selection.values())
    assert out.selection[f"C={out.chosen['C']:g}"] == ev.topk_accuracy(out.scores, y_test, 1)


def test_svm_scores_cover_every_class_even_when_training_lacks_some() -> None:
    x_bank, y_bank, groups, x_test, _ = _synthetic(n_classes=2)
    y_bank = y_bank * 2  # classes 0 and 2 of 3: a binary LinearSVC whose columns must land on ids 0 and 2
    out = ev.fit_svm(
        x_bank, y_bank, groups, x_test, n_classes=3, costs=[1.0], n_splits=3, max_iter=1000, seed=0
    )
    assert out.scores.shape == (len(x_test), 3)
    assert set(out.scores.argmax(1)) == {0, 2} and (out.scores[:, 1] < out.scores[:, [0, 2]].min(1)).all()


def test_cv_folds_keep_the_views_of_a_video_together() -> None:
    _, y_bank, groups, _, _ = _synthetic(train_videos=10, views=4)
    splits = ev.cv_folds(y_bank, groups, n_splits=3, seed=0)
    assert len(splits) == 3
    seen = np.zeros(len(groups), dtype=int)
    for train, held_out in splits:
        assert not set(groups[train]) & set(groups[held_out])
        seen[held_out] += 1
    assert (seen == 1).all()  # every row is held out exactly once


def test_knn_leave_one_out_excludes_the_query_video() -> None:
    x = np.eye(4, dtype=np.float32)  # four orthogonal videos: each one's only similar row is itself
    y = np.array([0, 1, 2, 3])
    groups = np.array(["a", "b", "c", "d"])
    with_self = ev.knn_scores(x, y, x, k=1, temperature=0.1, n_classes=4)
    assert (with_self.argmax(1) == y).all()
    loo = ev.knn_scores(x, y, x, k=1, temperature=0.1, n_classes=4, train_groups=groups, test_groups=groups)
    assert not (loo.argmax(1) == y).any()


def test_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.6, 0.25, 0.15]])
    labels = np.array([0, 1, 1, 2])
    assert ev.topk_accuracy(scores, labels, 1) == 0.5
    assert ev.topk_accuracy(scores, labels, 2) == 0.75
    assert ev.topk_accuracy(scores, labels, 5) == 1.0  # k above the class count means every class
    # Class 0: one positive ranked first -> AP 1; class 1: positives ranked 1st and 2nd -> 1; class 2: the positive
    # is ranked 3rd of 4 by column 2 (0.5, 0.2, 0.1 ...) -> AP 1/3.
    assert ev.mean_average_precision(scores, labels) == pytest.approx((1 + 1 + 1 / 3) / 3)


# ---- feature averaging and combination ---------------------------------------------------------------------------
def test_accumulator_averages_clips_per_key_across_batches() -> None:
    acc = ev.FeatureAccumulator(average=True)
    acc.add(["b", "a", "b"], torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0]]))
    acc.add(["a"], torch.tensor([[4.0, 0.0]]))
    out = acc.result()
    assert out.keys.tolist() == ["a", "b"]
    np.testing.assert_allclose(out.values, [[3.0, 1.0], [2.0, 2.0]])
    bank = ev.FeatureAccumulator(average=False)
    bank.add(["b", "a", "b"], torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0]]))
    assert bank.result().keys.tolist() == ["a", "b", "b"]


def test_audio_video_features_are_normalised_then_concatenated() -> None:
    video = ev.Features(
        np.array(["k1", "k1", "k2"]), np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], np.float32)
    )
    audio = ev.Features(
        np.array(["k1", "k2", "k1"]), np.array([[0.0, 5.0], [2.0, 0.0], [6.0, 8.0]], np.float32)
    )
    both = ev.combine({"video": video, "audio": audio}, "audio+video")
    assert both.keys.tolist() == [
        "k1",
        "k1",
        "k2",
    ]  # the i-th view of a key pairs with its i-th view elsewhere
    np.testing.assert_allclose(
        both.values, [[0.6, 0.8, 0.0, 1.0], [0.0, 1.0, 0.6, 0.8], [1.0, 0.0, 1.0, 0.0]], rtol=1e-6
    )
    assert ev.combine({"video": video}, "video") is video


def test_group_mean_aggregates_windows_of_a_source() -> None:
    groups, means = ev.group_mean(np.array([[1.0], [3.0], [10.0]]), np.array(["s", "s", "t"]))
    assert groups.tolist() == ["s", "t"]
    np.testing.assert_allclose(means, [[2.0], [10.0]])


# ---- folds and class subsets -------------------------------------------------------------------------------------
def _meta(
    key: str, label: int, split: str = "all", folds: dict[str, str] | None = None, name: str = ""
) -> SampleMeta:
    return SampleMeta(
        key=key, dataset="hmdb51", source=f"{key}.avi", split=split, label=label, label_name=name or f"c{label}",
        duration_s=4.0, fps=8.0, num_frames=32, mel_frames=448, has_audio=True, folds=folds, width=170, height=128,
    )  # fmt: skip


def _index(samples: list[SampleMeta], classes: list[str] | None = None) -> ev.ShardIndex:
    return ev.ShardIndex(Path("shards/x"), classes or ["c0", "c1", "c2"], samples)


def test_fold_split_uses_exactly_the_official_membership() -> None:
    # HMDB51-style membership: 1 = train, 2 = test, 0 = unused (absent from that fold's mapping).
    samples = [
        _meta("a", 0, folds={"1": "train", "2": "test", "3": "train"}),
        _meta("b", 1, folds={"1": "test", "2": "train"}),  # unused in fold 3
        _meta("c", 2, folds={"1": "train", "3": "test"}),  # unused in fold 2
        _meta("d", 0, folds={"1": "test", "2": "train", "3": "test"}),
    ]
    index = _index(samples)
    assert index.folds() == [1, 2, 3]
    expected = {1: ({"a", "c"}, {"b", "d"}), 2: ({"b", "d"}, {"a"}), 3: ({"a"}, {"c", "d"})}
    for fold, (train, test) in expected.items():
        got_train, got_test = ev.fold_split(index, fold, "auto")
        assert {s.key for s in got_train} == train and {s.key for s in got_test} == test
    with pytest.raises(ValueError, match=r"fold 4 does not exist in shards/x: available folds: 1, 2, 3"):
        ev.fold_split(index, 4, "auto")


def test_demo_layout_has_only_fold_1() -> None:
    index = _index([_meta("a", 0, folds={"1": "train"}), _meta("b", 1, folds={"1": "test"})])
    assert index.folds() == [1]
    with pytest.raises(ValueError, match="fold 2 does not exist .* available folds: 1$"):
        ev.fold_split(index, 2, "auto")


def test_split_datasets_use_train_and_val_or_test() -> None:
    samples = [_meta("a", 0, "train"), _meta("b", 1, "val"), _meta("c", 1, "test")]
    train, test = ev.fold_split(_index(samples), None, "auto")
    assert [s.key for s in train] == ["a"] and [s.key for s in test] == [
        "b"
    ]  # Kinetics: val is the test split
    assert [s.key for s in ev.fold_split(_index(samples), None, "test")[1]] == ["c"]
    with pytest.raises(ValueError, match="fold 1 does not exist .* none"):
        ev.fold_split(_index(samples), 1, "auto")


def test_unlabelled_shards_are_refused() -> None:
    with pytest.raises(ValueError, match="have no label"):
        ev.check_labels(_index([_meta("a", 0, "train"), _meta("b", -1, "train")]))


def test_kinetics_sound_subset_renumbers_labels_in_list_order() -> None:
    classes = ["abseiling", "playing_drums", "bowling", "singing"]  # Kinetics copies may spell `_` for spaces
    samples = [_meta(f"k{i}", i, "train", name=c) for i, c in enumerate(classes)]
    sub = ev.select_classes(_index(samples, classes), ["bowling", "playing drums", "singing"])
    assert sub.classes == ["bowling", "playing_drums", "singing"]
    assert [(s.key, s.label) for s in sub.samples] == [("k1", 1), ("k2", 0), ("k3", 2)]
    with pytest.raises(ValueError, match=r"29 of the 32 requested classes are not in"):
        ev.select_classes(_index(samples, classes), list(ev.KINETICS_SOUND))
    assert len(ev.KINETICS_SOUND) == len(set(ev.KINETICS_SOUND)) == 32


# ---- feature cache -----------------------------------------------------------------------------------------------
def test_cache_round_trip_without_pickle(tmp_path) -> None:
    feats = ev.Features(np.array(["a", "b"]), np.arange(6, dtype=np.float32).reshape(2, 3))
    path = tmp_path / "c" / "x.npz"
    ev.save_cached(path, feats)
    back = ev.load_cached(path)
    assert back.keys.tolist() == ["a", "b"] and np.array_equal(back.values, feats.values)
    assert ev.load_cached(tmp_path / "missing.npz") is None
    assert ev.cache_key(a=1, b=[1, 2]) == ev.cache_key(b=[1, 2], a=1) != ev.cache_key(a=2, b=[1, 2])


# ---- export loading ----------------------------------------------------------------------------------------------
def tiny_model(**overrides) -> ModelConfig:
    """The house-style tiny model with the shards' 80 mel bins (16-bin tall audio patches)."""
    return ModelConfig.from_name("tiny", audio_mels=80, audio_patch_mels=16, **overrides)


def tiny_data(cfg: ModelConfig, **overrides) -> DataConfig:
    """The `DataConfig` a pretraining run of `cfg` writes to data.json (geometry agreeing with the model)."""
    return DataConfig(
        video_frames=cfg.video_frames, video_size=cfg.video_size, video_local_frames=cfg.video_local_frames,
        video_local_size=cfg.video_local_size, video_local_views=cfg.video_local_views,
        audio_mel_bins=cfg.audio_mels, audio_mel_frames=cfg.audio_frames,
        audio_local_mel_frames=cfg.audio_local_frames, audio_local_views=cfg.audio_local_views,
        video_eval_resize=36, **overrides,
    )  # fmt: skip


def write_export(path: Path, cfg: ModelConfig, backbones=("student", "teacher"), seed: int = 0) -> Path:
    """An export in the contract's format (`docs/design.md`) from randomly initialised encoders of `cfg`."""
    import yaml
    from safetensors.torch import save_file

    from xkd.model.encoder import build_encoder

    torch.manual_seed(seed)
    tensors = {}
    for backbone in backbones:
        for modality in cfg.modalities:
            for k, v in build_encoder(cfg, modality).state_dict().items():
                tensors[f"{backbone}.{modality}.{k}"] = v.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "encoders.safetensors")
    (path / "model.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg)))))
    (path / "data.json").write_text(json.dumps(dataclasses.asdict(tiny_data(cfg))))
    return path


def test_export_loads_encoders_and_reports_missing_backbones(tmp_path) -> None:
    cfg = tiny_model(objective="mr")
    export = ev.load_export(write_export(tmp_path / "export", cfg, backbones=("student",)))
    assert export.encoders == {"student": ("video", "audio")}
    enc = ev.load_encoder(export, "student", "video")
    x = torch.randn(2, 3, cfg.video_frames, cfg.video_size, cfg.video_size)
    assert enc.forward_features(x).shape == (2, cfg.embed_dim)
    with pytest.raises(
        ValueError, match=r"no teacher backbone .* MR ablations.* holds student \(video\+audio\)"
    ):
        ev.load_encoder(export, "teacher", "video")


def test_export_of_another_size_is_refused(tmp_path) -> None:
    path = write_export(tmp_path / "export", tiny_model())
    # model.yaml claims a wider model than the weights hold.
    wider = dataclasses.asdict(tiny_model(embed_dim=64, num_heads=4))
    wider["mmd_gammas"] = list(wider["mmd_gammas"])
    import yaml

    (path / "model.yaml").write_text(yaml.safe_dump(wider))
    export = ev.load_export(path)
    with pytest.raises(
        ValueError, match=r"do not fit the encoder .*\(embed_dim=64.*another architecture or size"
    ):
        ev.load_encoder(export, "teacher", "video")
    (path / "model.yaml").write_text(yaml.safe_dump({**wider, "num_experts": 8}))
    with pytest.raises(ValueError, match=r"unknown fields: \['num_experts'\]"):
        ev.load_export(path)


# ---- fine-tuning pieces ------------------------------------------------------------------------------------------
def test_mixup_and_cutmix_targets() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 3, 2, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    same, target = ev.mix_batch(x, y, 5, mixup=0.0, cutmix=0.0, smoothing=0.1, generator=g)
    assert same is x and torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(target[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0)):
        mixed, target = ev.mix_batch(x, y, 5, mixup=mixup, cutmix=cutmix, smoothing=0.0, generator=g)
        # Row 0 is mixed with row 3 (the batch reversed); its target weight on class 0 is the share of row 0's
        # pixels, for mixup the blend factor and for CutMix the area left outside the box.
        lam = float(target[0, 0])
        assert target[0, 3] == pytest.approx(1 - lam) and 0 <= lam <= 1
        if cutmix:
            assert ((mixed[0] == 0).float().mean()) == pytest.approx(lam)
        else:
            assert torch.allclose(mixed[0], torch.full_like(mixed[0], 3 * (1 - lam)))


def test_layer_decay_groups_scale_by_depth_and_skip_decay_on_embeddings() -> None:
    cfg = ModelConfig.from_name("tiny")
    from xkd.model.encoder import build_encoder

    model = ev.Classifier(
        build_encoder(cfg, "video"), 3, 0.5, frozen=False, normalise=False, generator=torch.Generator()
    )
    groups = ev.layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = cfg.depth  # 2: embeddings scale 0.5^3, block 0 0.5^2, block 1 0.5, norm and head 1
    assert by_param[id(named["encoder.pos_embed"])]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_param[id(named["encoder.pos_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])]["lr_scale"] == 0.5**depth
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["encoder.blocks.1.norm1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(named)
    frozen = ev.Classifier(
        build_encoder(cfg, "video"), 3, 0.0, frozen=True, normalise=False, generator=torch.Generator()
    )
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    frozen.train()
    assert not frozen.encoder.training  # the frozen backbone stays in eval mode


def test_video_and_audio_augmentations_keep_shapes() -> None:
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16)
    out = ev.augment_video(video, ops=2, magnitude=7, erasing=1.0)
    assert out.shape == video.shape and not torch.equal(out, video)
    audio = torch.randn(3, 1, 16, 40)
    masked = ev.augment_audio(audio, torch.Generator().manual_seed(1))
    assert masked.shape == audio.shape
    changed = masked != audio
    assert torch.equal(
        masked[changed], torch.zeros(int(changed.sum()))
    )  # masks fill with the (normalised) mean


def test_cli_parses_flags_and_config_file(tmp_path) -> None:
    (tmp_path / "p.yaml").write_text("probe: knn\nseed: 3\n")
    cfg = ev.parse_config(
        ["--config", str(tmp_path / "p.yaml"), "--folds", "[1, 3]", "--backbone", "student"]
    )
    assert (cfg.probe, cfg.seed, cfg.folds, cfg.backbone) == ("knn", 3, [1, 3], "student")
    assert ev.parse_config([]).export.as_posix() == "runs/demo/export"  # the contract's defaults
    with pytest.raises(ValueError, match="kNN probe has only --protocol default"):
        ev.ProbeConfig(probe="knn", protocol="release")


# ---- end to end on the demo shards -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini demo dataset (3 classes x 4 clips, UCF101 layout, fold 1 only) and its shards from xkd-shard."""
    from xkd.sharding import cli
    from xkd.sharding import demo as demo_data

    root = tmp_path_factory.mktemp("demo")
    demo_data.main(["--out", str(root / "raw"), "--mini"])
    assert cli.main(["--src", str(root / "raw"), "--out", str(root / "shards"), "--workers", "0"]) == 0
    return root


def _eval(root: Path, export: Path, *args: str) -> dict:
    return ev.main(
        ["--export", str(export), "--shards", str(root / "shards"), "--cache_dir", str(root / "cache"),
         "--results_dir", str(root / "results"), "--num_workers", "0", "--batch_size", "4", *args]
    )  # fmt: skip


def test_random_init_export_end_to_end_and_cached_features_are_reused(demo: Path, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", tiny_model())
    first = _eval(demo, export, "--probe", "svm", "--linear_epochs", "5")
    assert first["benchmark"] == "demo" and first["backbone"] == "teacher" and first["protocol"] == "default"
    assert [f["fold"] for f in first["folds"]] == [1]  # the demo has fold 1 only
    assert first["folds"][0]["n_train"] == 9 and first["folds"][0]["n_test"] == 3
    assert 0 <= first["mean"]["top1"] <= 100 and first["feature_extractions"] == 2  # bank + test features
    saved = json.loads((demo / "results" / "demo_svm_video_teacher_default.json").read_text())
    assert saved["export_sha256"] == first["export_sha256"] and saved["seed"] == 0
    assert "| 1 | 9 | 3 |" in (demo / "results" / "demo_svm_video_teacher_default.md").read_text()
    # The same features serve another probe: nothing is extracted again.
    second = _eval(demo, export, "--probe", "linear", "--linear_epochs", "5")
    assert second["feature_extractions"] == 0
    again = _eval(demo, export, "--probe", "svm")
    assert again["feature_extractions"] == 0 and again["folds"][0]["top1"] == first["folds"][0]["top1"]


def test_feature_extraction_is_deterministic(demo: Path, tmp_path: Path) -> None:
    export = ev.load_export(write_export(tmp_path / "export", tiny_model()))
    cfg = ev.ProbeConfig(
        export=export.path, shards=demo / "shards", cache_dir=tmp_path / "cache", use_cache=False, num_workers=0,
        batch_size=4,
    )  # fmt: skip
    index = ev.read_index(cfg.shards)
    data = ev.probe_data_config(export, cfg, None, 32)
    runs = []
    for _ in range(2):  # fresh stores: nothing is shared between the passes
        store = ev.FeatureStore(cfg, export, index, data, torch.device("cpu"))
        bank = store.features("bank", "train", 1, ["video", "audio"], count=9, clips=1, crops=1, views=2)
        test = store.features("eval", "test", 1, ["video"], count=3, clips=2, crops=3, views=0)
        runs.append({**{f"bank_{m}": f for m, f in bank.items()}, "test_video": test["video"]})
        assert store.extractions == 2
    for name, feats in runs[0].items():
        assert feats.keys.tolist() == runs[1][name].keys.tolist(), name
        np.testing.assert_array_equal(feats.values, runs[1][name].values)
    assert len(runs[0]["bank_video"].keys) == 18  # 2 views x 9 training videos
    assert (
        sorted(set(runs[0]["test_video"].keys.tolist())) == runs[0]["test_video"].keys.tolist()
    )  # 1 row/video


def test_clear_errors_on_demo_shards(demo: Path, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", tiny_model(objective="mr"), backbones=("student",))
    with pytest.raises(ValueError, match="fold 2 does not exist .* available folds: 1"):
        _eval(demo, export, "--probe", "knn", "--backbone", "student", "--folds", "[2]")
    with pytest.raises(ValueError, match="no teacher backbone"):
        _eval(demo, export, "--probe", "knn")
    with pytest.raises(ValueError, match="never upsamples silently.*--short-side"):
        _eval(demo, export, "--probe", "knn", "--backbone", "student", "--resolution", "224")


def test_supervised_protocols_run_on_train_machinery(demo: Path, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", tiny_model())
    fc = _eval(demo, export, "--probe", "linear", "--protocol", "paper", "--linear_epochs", "2",
               "--linear_warmup_epochs", "1", "--linear_batch_size", "4")  # fmt: skip
    assert fc["resolution"] == 32 and fc["folds"][0]["n_test"] == 3
    ft = _eval(demo, export, "--probe", "finetune", "--ft_epochs", "1", "--ft_warmup_epochs", "0",
               "--ft_batch_size", "4", "--protocol", "release")  # fmt: skip
    assert ft["resolution"] == 64 and ft["test_crops"] == 3  # twice the pretraining crop, 3 crops (paper)
    assert ft["folds"][0]["chosen"] == {"epoch": 1} and "TEST split" in ft["selection"]


def test_extract_writes_one_row_per_input_video(demo: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    videos = tmp_path / "videos"
    videos.mkdir()
    for src in sorted((demo / "raw").rglob("*.avi"))[:3]:
        shutil.copy(src, videos / src.name)
    (videos / "broken.avi").write_bytes(b"not a video")
    export = write_export(tmp_path / "export", tiny_model())
    out = tmp_path / "features.parquet"
    ev.main(["--extract", str(videos), "--export", str(export), "--out", str(out), "--cache_dir", str(tmp_path / "c"),
             "--num_workers", "0"])  # fmt: skip
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert sorted(r["source"] for r in rows) == sorted(p.name for p in videos.iterdir())
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(
        len(r["video_embedding"]) == 32 and len(r["audio_embedding"]) == 32 for r in ok
    )
    (bad,) = [r for r in rows if r["status"] != "ok"]
    assert bad["source"] == "broken.avi" and bad["video_embedding"] is None and bad["reason"]
    assert table.schema.metadata[b"xkd.backbone"] == b"teacher"
    # Shards as input: one row per sample.
    ev.main(["--extract", str(demo / "shards"), "--export", str(export), "--out", str(out), "--cache_dir",
             str(tmp_path / "c"), "--num_workers", "0", "--modality", "video"])  # fmt: skip
    assert pq.read_table(out).num_rows == 12


def test_trained_export_end_to_end_with_either_backbone(demo: Path, tmp_path: Path) -> None:
    import train

    model = tiny_model()
    data = dataclasses.replace(tiny_data(model), shards=str(demo / "shards"), num_workers=0)
    cfg = train.TrainConfig(
        name="tiny", runs_dir=tmp_path / "runs", model=model, data=data, epochs=2, warmup_epochs=1,
        teacher_temp_warmup_epochs=1, batch_size=4, max_steps=2, lr=1e-3, log_every=1, checkpoint_every=2,
        trackers=[], precision="fp32",
    )  # fmt: skip
    export = train.main(cfg) / "export"
    results = {
        b: _eval(demo, export, "--probe", "knn", "--backbone", b, "--knn_ks", "[3]")
        for b in ("teacher", "student")
    }
    for backbone, result in results.items():
        assert result["backbone"] == backbone and result["folds"][0]["n_test"] == 3
        saved = json.loads((demo / "results" / f"demo_knn_video_{backbone}_default.json").read_text())
        assert saved["backbone"] == backbone and saved["export"] == str(export)
    # A class subset through the pipeline's selection: labels renumbered the same way on both sides.
    (tmp_path / "two.txt").write_text("VBarSlow\nHBarSlow\n")
    subset = _eval(
        demo, export, "--probe", "svm", "--classes", str(tmp_path / "two.txt"), "--confusion_matrix", "true"
    )
    assert subset["n_classes"] == 2 and (subset["folds"][0]["n_train"], subset["folds"][0]["n_test"]) == (
        6,
        2,
    )
    assert (demo / "results" / "confusion_demo_svm_fold1.png").is_file()


def test_audio_only_fold_dataset_evaluates_every_fold(tmp_path: Path) -> None:
    """ESC-50 layout (5 folds, audio only) through xkd-shard: modality audio, each fold scored, mean reported."""
    import wave

    from xkd.sharding import cli

    src = tmp_path / "esc50"
    (src / "audio").mkdir(parents=True)
    (src / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    rng = np.random.default_rng(0)
    t = np.arange(5 * 16000) / 16000
    for fold in range(1, 6):
        for target, category in enumerate(("tone", "noise")):
            name = f"{fold}-{100 + fold}-A-{target}.wav"
            signal = np.sin(2 * np.pi * 440 * t) if target == 0 else rng.normal(size=t.size) * 0.3
            with wave.open(str(src / "audio" / name), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
                w.writeframes((signal * 0.5 * 32767).astype(np.int16).tobytes())
            rows.append(f"{name},{fold},{target},{category},False,{100 + fold},A")
    (src / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    assert cli.main(["--src", str(src), "--out", str(tmp_path / "shards"), "--workers", "0"]) == 0
    export = write_export(tmp_path / "export", tiny_model())
    result = ev.main(
        ["--export", str(export), "--shards", str(tmp_path / "shards"), "--cache_dir", str(tmp_path / "cache"),
         "--probe", "svm", "--train_views", "3", "--num_workers", "0"]
    )  # fmt: skip
    assert (result["benchmark"], result["modality"]) == ("esc50", "audio")
    assert [f["fold"] for f in result["folds"]] == [1, 2, 3, 4, 5]
    assert all((f["n_train"], f["n_test"]) == (8, 2) for f in result["folds"])
    assert result["mean"]["top1"] == pytest.approx(np.mean([f["top1"] for f in result["folds"]]))
    assert (
        tmp_path / "eval" / "esc50_svm_audio_teacher_default.md"
    ).is_file()  # beside the export by default
