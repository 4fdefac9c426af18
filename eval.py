"""Evaluation of pretrained XKD encoders: frozen-feature probes, full fine-tuning and feature export.

Implements the downstream protocols of the paper (`../shared/xkd-method.md` section 5 and the project decisions 2
and 3): pooled features (final-LN patch tokens averaged, CLS excluded) of the teacher or the student backbone, a
LinearSVC on an augmented feature bank (UCF101, HMDB51, ESC-50, Kinetics-Sound, Kinetics-400), a linear classifier
(the FC protocol), a kNN probe, and full fine-tuning. Hyper-parameters are chosen by cross-validation on the
training split; the release's test-split selection is available only as `--protocol release`, labelled as such.

    python eval.py --probe linear                       # runs/demo/export on data/demo/shards, teacher backbone
    python eval.py --probe svm --shards shards/ucf101 --export runs/k400/export
    python eval.py --extract my_videos/ --out features.parquet
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from torch import nn

from xkd.model import Encoder, ModelConfig, build_encoder
from xkd.pipeline.batch import Batch
from xkd.pipeline.config import DataConfig
from xkd.sharding.schema import JSON_EXT, SampleMeta

# Bump when feature extraction changes in a way the cache key does not see (pooling, averaging, file layout).
CACHE_VERSION = 1

# The 32 Kinetics-400 classes of Kinetics-Sound as used by the XKD authors (`../shared/data-formats.md`).
KINETICS_SOUND = (
    "blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball", "laughing",
    "mowing lawn", "playing accordion", "playing bagpipes", "playing bass guitar", "playing clarinet",
    "playing drums", "playing guitar", "playing harmonica", "playing keyboard", "playing organ", "playing piano",
    "playing saxophone", "playing trombone", "playing trumpet", "playing violin", "playing xylophone",
    "ripping paper", "shoveling snow", "shuffling cards", "singing", "stomping grapes", "strumming guitar",
    "tap dancing", "tapping guitar", "tapping pen", "tickling",
)  # fmt: skip


@dataclass
class ProbeConfig:
    """Everything `eval.py` does, as one typed config (jsonargparse CLI; `--config file.yaml` sets defaults)."""

    export: Path = Path("runs/demo/export")
    """Export directory of a pretraining run (`encoders.safetensors`, `model.yaml`, `data.json`)."""
    shards: Path = Path("data/demo/shards")
    """Labelled evaluation shards written by `xkd-shard` (with `dataset.json`)."""
    probe: Literal["linear", "svm", "knn", "finetune"] = "linear"
    """`linear`: linear classifier on frozen features; `svm`: LinearSVC on an augmented feature bank (the paper's
    UCF/HMDB/ESC/KS protocol); `knn`: weighted kNN on frozen features; `finetune`: full fine-tuning."""
    protocol: Literal["default", "paper", "release"] = "default"
    """`default`: cached augmented feature bank, hyper-parameters by cross-validation on the train split.
    `paper`: the paper's recipe (linear: the FC protocol with on-the-fly augmentation through the frozen
    backbone). `release`: `paper`, but the SVM cost / linear epoch is picked on the TEST split as the authors'
    release did (optimistic; reported as such)."""
    backbone: Literal["teacher", "student"] = "teacher"
    """Which pretrained backbone to evaluate (project decision 3: the EMA teacher by default)."""
    modality: Literal["auto", "video", "audio", "audio+video"] = "auto"
    """Features to probe. `audio+video` L2-normalises each modality's feature and concatenates them (the paper's
    Kinetics-Sound protocol). `auto`: the benchmark's modality (audio for audio-only shards)."""
    benchmark: Literal[
        "auto", "ucf101", "hmdb51", "kinetics400", "kinetics-sound", "esc50", "demo", "generic"
    ] = "auto"
    """Dataset protocol (bank size, test clips, SVM cost grid, fine-tuning recipe, class subset). `auto` detects it
    from the shards' dataset name; `kinetics-sound` selects its 32 classes from Kinetics-400 shards."""
    folds: list[int] | None = None
    """Folds to evaluate for fold datasets (UCF101/HMDB51: 1-3, ESC-50: 1-5); None: every fold the shards have."""
    classes: Path | None = None
    """Optional class subset: a text file with one class name per line (labels are renumbered in that order)."""
    test_split: Literal["auto", "val", "test"] = "auto"
    """Test split of datasets without folds; `auto`: `val` if the shards have one (Kinetics), else `test`."""
    train_views: int | None = None
    """Augmented clips per training video in the feature bank; None: the benchmark's paper value."""
    test_clips: int | None = None
    """Evenly spaced clips per test video whose features are averaged; None: the benchmark's paper value."""
    test_crops: int | None = None
    """Spatial crops per test clip, 1 (centre) or 3 (left/centre/right), averaged; None: 1 for the feature probes
    (the release's 3 crops were identical there), 3 for fine-tuning and the FC protocol."""
    resolution: int | None = None
    """Video crop size in pixels; None: the export's pretraining size, doubled (the paper's 112 -> 224 px) for
    fine-tuning and the Kinetics-400 FC protocol. Shards need a short side of at least 8/7 of it (no upsampling)."""
    batch_size: int = 32
    """Videos per extraction batch (each adds its test clips x crops rows; bank: clips per batch)."""
    num_workers: int = 2
    """Data-loader workers for extraction and parallel jobs for cross-validation."""
    device: str | None = None
    """Torch device; None: `cuda` when available, else `cpu`."""
    seed: int = 0
    """Seed for the feature bank's augmentation, the probes and cross-validation; recorded in the results."""
    cv_folds: int = 3
    """Folds of the grouped, stratified cross-validation on the train split (views of one video stay together)."""
    svm_costs: list[float] | None = None
    """LinearSVC cost grid; None: the benchmark's grid ({1e-3..1} video, {1e-5..1} audio and audio+video)."""
    svm_max_iter: int = 1000
    """LinearSVC iteration limit (the release's value)."""
    linear_epochs: int = 100
    """Epochs of the linear classifier (the paper's FC protocol: 100)."""
    linear_lr: float = 0.01
    """Peak learning rate of the linear classifier (AdamW, the paper's 0.01)."""
    linear_warmup_epochs: int = 10
    """Linear warmup epochs before the cosine decay (the paper's 10)."""
    linear_batch_size: int = 256
    """Batch size of the linear classifier."""
    linear_weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3])
    """Weight-decay grid of the linear classifier, chosen by cross-validation (the paper used 0)."""
    knn_ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    """Neighbour counts for the kNN probe, chosen by leave-one-out accuracy on the train split."""
    knn_temperature: float = 0.07
    """Temperature of the kNN vote weights exp(cosine / T)."""
    ft_epochs: int = 100
    """Fine-tuning epochs (the paper's 100)."""
    ft_batch_size: int | None = None
    """Global fine-tuning batch size; None: the benchmark's (96 video, 64 ESC-50)."""
    ft_lr: float | None = None
    """Fine-tuning base learning rate; None: the benchmark's (UCF101/K400 5e-4, HMDB51 and ESC-50 1e-4)."""
    ft_warmup_epochs: int | None = None
    """Fine-tuning warmup epochs; None: the benchmark's (UCF101/K400 5, HMDB51 20, ESC-50 10)."""
    ft_layer_decay: float | None = None
    """Layer-wise learning-rate decay; None: the benchmark's (UCF101/K400 0.45, HMDB51 0.75, ESC-50 0.65)."""
    ft_weight_decay: float | None = None
    """Fine-tuning weight decay; None: the benchmark's (0.05 video, 0.005 ESC-50)."""
    ft_mixup: float | None = None
    """Mixup alpha; None: the benchmark's (UCF101/K400 0.6, HMDB51 1.0, ESC-50 0); 0 disables."""
    ft_cutmix: float | None = None
    """CutMix alpha; None: the benchmark's (UCF101/K400 0.5, HMDB51 1.0, ESC-50 0); 0 disables."""
    ft_label_smoothing: float = 0.1
    """Label smoothing of the fine-tuning cross-entropy."""
    ft_randaugment_ops: int = 4
    """RandAugment operations per video (`rand-m7-n4`); the same operations apply to every frame of a clip."""
    ft_randaugment_magnitude: int = 7
    """RandAugment magnitude (`rand-m7-n4`)."""
    ft_random_erasing: float = 0.25
    """Random-erasing probability per video (pixel mode)."""
    ft_dropout: float = 0.5
    """Dropout before the fine-tuning head."""
    results_dir: Path | None = None
    """Where the JSON and Markdown results go; None: `eval/` beside the export (e.g. `runs/demo/eval`)."""
    cache_dir: Path = Path(".xkd-cache")
    """Feature cache, keyed by a hash of the export, the shards and the extraction parameters."""
    use_cache: bool = True
    """Reuse cached features; False re-extracts (and refreshes the cache)."""
    confusion_matrix: bool = False
    """Also write a confusion-matrix PNG per fold."""
    extract: Path | None = None
    """Feature export mode: a folder of videos (sharded into a temporary directory first) or a shard folder."""
    out: Path = Path("features.parquet")
    """`--extract` output: a Parquet file with one row per input video."""

    def __post_init__(self) -> None:
        if self.folds is not None and any(f < 1 for f in self.folds):
            raise ValueError(f"folds are numbered from 1, got {self.folds}")
        if self.train_views is not None and self.train_views < 1:
            raise ValueError(f"train_views must be >= 1, got {self.train_views}")
        if self.test_clips is not None and self.test_clips < 1:
            raise ValueError(f"test_clips must be >= 1, got {self.test_clips}")
        if self.test_crops not in (None, 1, 3):
            raise ValueError(f"test_crops must be 1 or 3, got {self.test_crops}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.probe == "knn" and self.protocol != "default":
            raise ValueError(
                "the kNN probe has only --protocol default (neither the paper nor the release has one)"
            )


@dataclass(frozen=True)
class Benchmark:
    """The paper's protocol values for one dataset (`../shared/xkd-method.md` 5.1-5.3)."""

    modality: Literal["video", "audio", "audio+video"]
    train_views: int
    test_clips: int
    svm_costs: tuple[float, ...]
    ft_lr: float
    ft_warmup_epochs: int
    ft_layer_decay: float
    ft_weight_decay: float
    ft_mixup: float
    ft_cutmix: float
    ft_batch_size: int = 96
    classes: tuple[str, ...] | None = None


_VIDEO_COSTS = (1e-3, 1e-2, 1e-1, 1.0)
_AUDIO_COSTS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_FT_UCF = dict(
    ft_lr=5e-4, ft_warmup_epochs=5, ft_layer_decay=0.45, ft_weight_decay=0.05, ft_mixup=0.6, ft_cutmix=0.5
)
BENCHMARKS: dict[str, Benchmark] = {
    "ucf101": Benchmark("video", 25, 3, _VIDEO_COSTS, **_FT_UCF),
    "hmdb51": Benchmark(
        "video", 25, 3, _VIDEO_COSTS, ft_lr=1e-4, ft_warmup_epochs=20, ft_layer_decay=0.75, ft_weight_decay=0.05,
        ft_mixup=1.0, ft_cutmix=1.0,
    ),
    "kinetics400": Benchmark("video", 3, 3, _VIDEO_COSTS, **_FT_UCF),
    "kinetics-sound": Benchmark("audio+video", 20, 2, _AUDIO_COSTS, **_FT_UCF, classes=KINETICS_SOUND),
    "esc50": Benchmark(
        "audio", 100, 3, _AUDIO_COSTS, ft_lr=1e-4, ft_warmup_epochs=10, ft_layer_decay=0.65, ft_weight_decay=0.005,
        ft_mixup=0.0, ft_cutmix=0.0, ft_batch_size=64,
    ),
    # The demo and unknown datasets: the UCF101 recipe with a small bank so that a CPU run takes minutes (demo
    # clips last 4 s, two windows of the demo model's 2 s).
    "demo": Benchmark("video", 4, 2, _VIDEO_COSTS, **_FT_UCF),
    "generic": Benchmark("video", 5, 3, _VIDEO_COSTS, **_FT_UCF),
}  # fmt: skip
# Dataset names xkd-shard writes (the layout name by default) -> benchmark.
_DATASET_BENCHMARK = {
    "ucf101": "ucf101", "hmdb51": "hmdb51", "kinetics": "kinetics400", "kinetics400": "kinetics400",
    "esc50": "esc50", "esc-50": "esc50", "demo": "demo",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Shard index, folds and class subsets
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """What evaluation needs to know of a shard set: its classes and every sample's metadata (shard order)."""

    root: Path
    classes: list[str]
    samples: list[SampleMeta]

    @property
    def dataset(self) -> str:
        names = sorted({s.dataset for s in self.samples})
        return names[0] if len(names) == 1 else "+".join(names)

    @property
    def has_video(self) -> bool:
        return any(s.has_video for s in self.samples)

    def folds(self) -> list[int]:
        """Fold ids present in the samples' `folds` membership (empty for datasets without folds)."""
        return sorted({int(f) for s in self.samples if s.folds for f in s.folds})

    def group(self, key: str) -> str:
        """The video a sample belongs to: its `source_key` for windows of a long source, else its own key."""
        return self._groups[key]

    def __post_init__(self) -> None:
        self._groups = {s.key: s.source_key or s.key for s in self.samples}


def shard_paths(shards: Path) -> list[Path]:
    """The tar shards of a shard folder, in name order."""
    return sorted(p for p in shards.glob("*.tar") if p.is_file())


def shards_fingerprint(shards: Path) -> str:
    """Names, sizes and modification times of the shards and `dataset.json` (re-sharding changes it)."""
    return fingerprint_files([*shard_paths(shards), shards / "dataset.json"], content=False)


def read_index(shards: Path, cache_dir: Path | None = None) -> ShardIndex:
    """Read `dataset.json` and the `<key>.json` member of every sample (tar headers are skipped, not decoded).

    With `cache_dir`, the sample list is kept in `index-<fingerprint>.jsonl` there: Kinetics-400 has 240k samples
    in hundreds of shards, and a re-run should not scan them again."""
    dataset_json = shards / "dataset.json"
    if not dataset_json.is_file():
        raise FileNotFoundError(
            f"{dataset_json} not found: {shards} is not a shard folder written by xkd-shard "
            f"(run `xkd-shard --src DIR --out {shards}` first)"
        )
    classes = json.loads(dataset_json.read_text())["classes"]
    tars = shard_paths(shards)
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shards}")
    cached = cache_dir / f"index-{shards_fingerprint(shards)}.jsonl" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return ShardIndex(shards, list(classes), [SampleMeta.from_json(line) for line in cached.open()])
    samples: list[SampleMeta] = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base.split(".", 1)[-1] == JSON_EXT:
                    try:
                        samples.append(SampleMeta.from_json(tf.extractfile(member).read()))
                    except ValueError as err:
                        raise ValueError(f"{tar}: member {member.name}: {err}") from None
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text("".join(s.to_json().decode() + "\n" for s in samples))
        tmp.replace(cached)
    return ShardIndex(shards, list(classes), samples)


def is_demo(index: ShardIndex) -> bool:
    """The built-in demo dataset (UCF101 layout, so its dataset name is `ucf101`): recognised by its class names."""
    from xkd.sharding.demo import MAX_CLASSES, class_names

    n = len(index.classes)
    return 2 <= n <= MAX_CLASSES and index.classes == class_names(n)


def check_labels(index: ShardIndex) -> None:
    """Fail unless every sample has a label (probes need them; `--extract` does not)."""
    unlabelled = [s.key for s in index.samples if s.label < 0]
    if unlabelled:
        raise ValueError(
            f"{index.root}: {len(unlabelled)} of {len(index.samples)} samples have no label (e.g. {unlabelled[0]}); "
            "probes need labelled shards (shard a dataset with class folders or split files), "
            "or use `--extract` for embeddings without labels"
        )


def members(index: ShardIndex, split: str, fold: int | None) -> list[SampleMeta]:
    """The samples the pipeline selects for `split` (and `fold`): fold datasets by their `folds` membership (a sample
    absent from a fold, e.g. HMDB51's "unused" entries, belongs to neither side), others by their split."""
    if fold is None:
        return [s for s in index.samples if s.split == split]
    return [s for s in index.samples if s.folds and s.folds.get(str(fold)) == split]


def fold_split(
    index: ShardIndex, fold: int | None, test_split: str
) -> tuple[list[SampleMeta], list[SampleMeta]]:
    """The train and test samples of one fold, exactly as the official split files define them.

    Fold datasets (UCF101, HMDB51, ESC-50) use the membership recorded per sample; other datasets use their `train`
    split and `test_split` (`auto`: `val` if present, as for Kinetics, else `test`).
    """
    available = index.folds()
    if fold is not None:
        if fold not in available:
            have = ", ".join(map(str, available)) if available else "none (this dataset has no folds)"
            raise ValueError(f"fold {fold} does not exist in {index.root}: available folds: {have}")
        return members(index, "train", fold), members(index, "test", fold)
    if available:
        raise ValueError(f"{index.root} is a fold dataset (folds {available}): pass a fold")
    splits = {s.split for s in index.samples}
    test = ("val" if "val" in splits else "test") if test_split == "auto" else test_split
    train, tests = members(index, "train", None), members(index, test, None)
    if not train or not tests:
        raise ValueError(
            f"{index.root} needs a 'train' and a '{test}' split for probing; it has {sorted(splits)}"
            + ("" if test_split != "auto" else " (choose one with --test_split)")
        )
    return train, tests


def select_classes(index: ShardIndex, names: Sequence[str]) -> ShardIndex:
    """Keep the samples of `names` (matched ignoring case and `_` vs space) and renumber labels in that order."""

    def norm(name: str) -> str:
        return name.replace("_", " ").strip().lower()

    position = {norm(c): i for i, c in enumerate(index.classes)}
    missing = [n for n in names if norm(n) not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(names)} requested classes are not in {index.root}/dataset.json: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    new_id = {position[norm(n)]: i for i, n in enumerate(names)}
    kept = [dataclasses.replace(s, label=new_id[s.label]) for s in index.samples if s.label in new_id]
    return ShardIndex(index.root, [index.classes[position[norm(n)]] for n in names], kept)


# ---------------------------------------------------------------------------------------------------------------
# Feature sets, test-time averaging and the feature cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Pooled features of one modality: one row per sample (test-time averaged) or per augmented view (bank)."""

    keys: np.ndarray
    """(N,) str: sample key of each row (repeated over the views of a bank)."""
    values: np.ndarray
    """(N, D) float32."""


class FeatureAccumulator:
    """Sums per-clip features by key so that K clips x crops of one video (flattened into batches in any order,
    possibly across batches) average into one row, or keeps every row for an augmented bank."""

    def __init__(self, average: bool) -> None:
        self.average = average
        self._rows: dict[str, list[np.ndarray]] = {}

    def add(self, keys: Sequence[str], values: torch.Tensor) -> None:
        values_np = values.detach().float().cpu().numpy()
        for key, row in zip(keys, values_np, strict=True):
            self._rows.setdefault(key, []).append(row)

    def result(self) -> Features:
        keys = sorted(self._rows)
        if not keys:  # e.g. a rank whose share of an evaluation split is empty
            return Features(np.array([], dtype=str), np.zeros((0, 0), dtype=np.float32))
        if self.average:
            # float64, so that the mean of many clips does not depend on the order in which they arrived.
            rows = [np.mean(np.stack(self._rows[k]).astype(np.float64), axis=0) for k in keys]
            return Features(np.array(keys), np.stack(rows).astype(np.float32))
        flat = [(k, r) for k in keys for r in self._rows[k]]
        return Features(np.array([k for k, _ in flat]), np.stack([r for _, r in flat]).astype(np.float32))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def combine(parts: dict[str, Features], modality: str) -> Features:
    """The probe input: one modality's features, or for `audio+video` each modality L2-normalised and then
    concatenated (the paper's Kinetics-Sound protocol). Bank rows pair the i-th view of a key in each modality."""
    if modality != "audio+video":
        return parts[modality]
    video, audio = parts["video"], parts["audio"]
    index_audio = {kv: i for i, kv in enumerate(_occurrences(audio.keys))}
    pairs = [(i, index_audio[kv]) for i, kv in enumerate(_occurrences(video.keys)) if kv in index_audio]
    vi, ai = np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)
    values = np.concatenate([l2_normalise(video.values[vi]), l2_normalise(audio.values[ai])], axis=1)
    return Features(video.keys[vi], values.astype(np.float32))


def _occurrences(keys: np.ndarray) -> list[tuple[str, int]]:
    """(key, n) for the n-th row of each key: pairs bank views across modalities."""
    seen: dict[str, int] = {}
    out = []
    for k in keys.tolist():
        out.append((k, seen.get(k, 0)))
        seen[k] = out[-1][1] + 1
    return out


def group_mean(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average rows sharing a group (the windows of one source, or the views of one video): (groups, means)."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(uniq), values.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    return uniq, (sums / counts).astype(values.dtype)


def fingerprint_files(paths: Iterable[Path], content: bool) -> str:
    """sha256 over file names and either their full content (exports: small enough to hash in a second) or their
    size and modification time (shards: hundreds of GB)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        if content:
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        else:
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(**parts: object) -> str:
    """A stable hash of everything that determines an extraction's output."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(path: Path) -> Features | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return Features(data["keys"], data["values"])


def save_cached(path: Path, features: Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=features.keys.astype(str), values=features.values)
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache entry under the final name


# ---------------------------------------------------------------------------------------------------------------
# Probes on feature arrays
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeOutput:
    """Test scores of one probe run and how its hyper-parameters were chosen."""

    scores: np.ndarray
    """(N_test, C) decision scores or logits, one row per test video."""
    chosen: dict[str, float]
    """The selected hyper-parameters, e.g. {"C": 0.1}."""
    selection: dict[str, float]
    """Score of every candidate on the selection data (CV accuracy on train, or test accuracy for `release`)."""
    notes: list[str] = field(default_factory=list)


def cv_folds(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped, stratified K-fold splits of the training rows: all rows of one video (its bank views, or the
    windows of one source) fall in the same fold, so no held-out row is a view of a video the probe was fit on."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    n_splits = min(n_splits, n_groups)
    if n_splits < 2:
        raise ValueError(f"cross-validation needs at least 2 training videos, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Classes with fewer videos than folds only make some folds unbalanced; the split stays valid.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))


def grouped_accuracy(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Top-1 accuracy after averaging scores per group, as the test protocol averages the clips of a video."""
    _, mean_scores = group_mean(scores, groups)
    _, first = np.unique(groups, return_index=True)
    return float((mean_scores.argmax(1) == labels[first]).mean())


def _select(
    candidates: Sequence[float],
    score: Callable[[float], float],
    name: str,
) -> tuple[float, dict[str, float]]:
    """The candidate with the best score (the smallest one on ties, i.e. the most regularised for a cost grid)."""
    table = {f"{name}={c:g}": score(c) for c in candidates}
    best = max(candidates, key=lambda c: (table[f"{name}={c:g}"], -c))
    return best, table


def fit_svm(
    x_train: np.ndarray,
    y_train: np.ndarray,
    groups: np.ndarray,
    x_test: np.ndarray,
    *,
    n_classes: int,
    costs: Sequence[float],
    n_splits: int,
    max_iter: int,
    seed: int,
    n_jobs: int = 1,
    y_test: np.ndarray | None = None,
) -> ProbeOutput:
    """LinearSVC (one-vs-rest, squared hinge, no feature scaling, as released) on an augmented feature bank.

    The cost is chosen by grouped cross-validation on the training rows; passing `y_test` instead selects it on
    the test split (the release protocol). Decision scores are affine in the features, so scoring the clip-averaged
    test feature equals averaging the clips' scores as the release did.
    """
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    def fit(c: float, rows: np.ndarray | slice) -> LinearSVC:
        return LinearSVC(C=c, max_iter=max_iter, random_state=seed).fit(x_train[rows], y_train[rows])

    def scores(svm: LinearSVC, x: np.ndarray) -> np.ndarray:
        """(N, n_classes) decision scores; a class absent from the fit's rows gets a score below every other."""
        raw = svm.decision_function(x)
        raw = np.stack([-raw, raw], axis=1) if raw.ndim == 1 else raw  # binary problems give one column
        full = np.full((len(x), n_classes), raw.min() - 1.0)
        full[:, svm.classes_] = raw
        return full

    # Threads, not processes: liblinear releases the GIL, and the bank is not copied into workers.
    parallel = Parallel(n_jobs=max(1, n_jobs), prefer="threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # noted from `n_iter_` below instead
        if y_test is None:
            jobs = [(c, tr, va) for c in costs for tr, va in cv_folds(y_train, groups, n_splits, seed)]
            fitted = parallel(delayed(fit)(c, tr) for c, tr, _ in jobs)
            per_cost: dict[float, list[float]] = {c: [] for c in costs}
            for (c, _, va), svm in zip(jobs, fitted):
                per_cost[c].append(grouped_accuracy(scores(svm, x_train[va]), y_train[va], groups[va]))
            best, table = _select(costs, lambda c: float(np.mean(per_cost[c])), "C")
            svm = fit(best, slice(None))
        else:
            fitted = dict(zip(costs, parallel(delayed(fit)(c, slice(None)) for c in costs)))
            best, table = _select(costs, lambda c: topk_accuracy(scores(fitted[c], x_test), y_test, 1), "C")
            svm = fitted[best]
    notes = (
        [f"LinearSVC did not converge in {max_iter} iterations at C={best:g}"]
        if svm.n_iter_ >= max_iter
        else []
    )
    return ProbeOutput(scores(svm, x_test), {"C": best}, table, notes)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine to 0 (the paper's probe and fine-tune schedule)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> nn.Linear:
    """A linear classifier on (already standardised) features: the paper's FC head (orthogonal init, AdamW (0.9,
    0.999), warmup + cosine, cross-entropy) trained on a feature bank instead of on-the-fly clips.

    The softmax cross-entropy gradient and the AdamW update are written out as a few tensor ops: with autograd and
    `torch.optim` the per-step overhead of a tiny head made a CPU probe take minutes (`test_eval` checks that both
    give the same weights)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.empty(n_classes, x.shape[1])
    nn.init.orthogonal_(weight, generator=g)
    params = [weight.to(x.device), torch.zeros(n_classes, device=x.device)]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(steps_per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            xb = x[rows]
            # d(mean CE)/d(logits) = (softmax - one_hot) / B
            dlogits = torch.softmax(xb @ params[0].T + params[1], dim=1)
            dlogits[torch.arange(len(rows), device=x.device), y[rows]] -= 1.0
            dlogits /= len(rows)
            grads = (dlogits.T @ xb, dlogits.sum(0))
            step += 1
            rate = lr * warmup_cosine(step - 1, total, warmup)
            for p, grad, (m, v) in zip(params, grads, moments):  # torch.optim.AdamW, decay on every parameter
                p.mul_(1.0 - rate * weight_decay)
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (v / (1.0 - beta2**step)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-rate / (1.0 - beta1**step))
    head = nn.Linear(x.shape[1], n_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(params[0])
        head.bias.copy_(params[1])
    return head


def fit_linear(
    x_train: np.ndarray,
    y_train: np.ndarray,
    groups: np.ndarray,
    x_test: np.ndarray,
    *,
    n_classes: int,
    weight_decays: Sequence[float],
    n_splits: int,
    epochs: int,
    lr: float,
    warmup_epochs: int,
    batch_size: int,
    seed: int,
    device: str = "cpu",
) -> ProbeOutput:
    """Linear classifier on a (cached, augmented) feature bank.

    Features are standardised with the training bank's mean and standard deviation (the role of MAE's affine-free
    BatchNorm before its linear probe). The weight decay is chosen by grouped cross-validation on the train rows.
    """
    mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True) + 1e-6

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)).to(device)

    xt, yt, xs = tensor(x_train), torch.from_numpy(y_train.astype(np.int64)).to(device), tensor(x_test)
    kwargs = dict(epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, batch_size=batch_size, seed=seed)

    def logits(head: nn.Linear, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return head(x).cpu().numpy()

    def cv_score(wd: float) -> float:
        accs = []
        for tr, va in cv_folds(y_train, groups, n_splits, seed):
            tr_t, va_t = torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device)
            head = train_linear(xt[tr_t], yt[tr_t], n_classes, weight_decay=wd, **kwargs)
            accs.append(grouped_accuracy(logits(head, xt[va_t]), y_train[va], groups[va]))
        return float(np.mean(accs))

    with single_thread(device == "cpu"):
        if len(weight_decays) > 1:
            best, table = _select(weight_decays, cv_score, "weight_decay")
        else:  # a single candidate needs no cross-validation
            best, table = weight_decays[0], {}
        head = train_linear(xt, yt, n_classes, weight_decay=best, **kwargs)
    return ProbeOutput(logits(head, xs), {"weight_decay": best}, table)


@contextlib.contextmanager
def single_thread(active: bool) -> Iterator[None]:
    """Run torch on one CPU thread inside the block: a step of a linear head is far too small for intra-op
    threads, which then cost more than they save (20x slower, measured on a busy 2-core machine)."""
    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def knn_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    *,
    k: int,
    temperature: float,
    n_classes: int,
    train_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Weighted kNN vote (DINO): the k most cosine-similar training rows vote for their class with exp(sim / T).

    With `train_groups` and `test_groups`, a test row never votes with a training row of its own group (the
    leave-one-video-out evaluation on the training split). Returns (N_test, n_classes) vote scores.
    """
    train_t = torch.from_numpy(l2_normalise(train)).float()
    labels_t = torch.from_numpy(train_labels.astype(np.int64))
    out = []
    for start in range(0, len(test), chunk):
        q = torch.from_numpy(l2_normalise(test[start : start + chunk])).float()
        sim = q @ train_t.T  # (chunk, N_train)
        if train_groups is not None and test_groups is not None:
            same = test_groups[start : start + chunk, None] == train_groups[None, :]
            sim = sim.masked_fill(torch.from_numpy(same), -float("inf"))
        top_sim, top_idx = sim.topk(min(k, train_t.shape[0]), dim=1)
        weights = (top_sim / temperature).exp()  # an excluded neighbour (-inf) weighs exp(-inf) = 0
        scores = torch.zeros(len(q), n_classes).scatter_add_(1, labels_t[top_idx], weights)
        out.append(scores.numpy())
    return np.concatenate(out)


def fit_knn(
    x_train: np.ndarray,
    y_train: np.ndarray,
    groups: np.ndarray,
    x_test: np.ndarray,
    *,
    n_classes: int,
    ks: Sequence[int],
    temperature: float,
) -> ProbeOutput:
    """kNN probe on clip-averaged features; k chosen by leave-one-video-out accuracy on the train split."""
    common = dict(temperature=temperature, n_classes=n_classes)

    def loo_accuracy(k: float) -> float:
        scores = knn_scores(
            x_train, y_train, x_train, k=int(k), train_groups=groups, test_groups=groups, **common
        )
        return topk_accuracy(scores, y_train, 1)

    best, table = _select([float(k) for k in ks], loo_accuracy, "k")
    return ProbeOutput(knn_scores(x_train, y_train, x_test, k=int(best), **common), {"k": int(best)}, table)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and results
# ---------------------------------------------------------------------------------------------------------------


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Macro mAP over the classes present in `labels` (one-vs-rest average precision of each class's scores)."""
    from sklearn.metrics import average_precision_score

    present = np.unique(labels)
    return float(np.mean([average_precision_score(labels == c, scores[:, c]) for c in present]))


def fold_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "top1": 100 * topk_accuracy(scores, labels, 1),
        "top5": 100 * topk_accuracy(scores, labels, 5),
        "mAP": 100 * mean_average_precision(scores, labels),
    }


# ---------------------------------------------------------------------------------------------------------------
# Export loading
# ---------------------------------------------------------------------------------------------------------------

WEIGHTS_FILE, MODEL_FILE, DATA_FILE = "encoders.safetensors", "model.yaml", "data.json"


@dataclass
class Export:
    """A pretraining export (`../shared/contracts.md`, "Where things live"): config, data facts and encoders."""

    path: Path
    model: ModelConfig
    data: dict[str, object]
    """`data.json`: mel statistics used in pretraining, fps and view geometry."""
    encoders: dict[str, tuple[str, ...]]
    """Backbone (`student`/`teacher`) -> modalities with weights in `encoders.safetensors`."""
    sha256: str
    """Content hash of the three files (feature-cache key, recorded in results)."""

    def require(self, backbone: str, modalities: Sequence[str]) -> None:
        """Fail clearly unless the export holds `backbone` encoders for every modality in `modalities`."""
        have = ", ".join(f"{b} ({'+'.join(m)})" for b, m in sorted(self.encoders.items())) or "none"
        if backbone not in self.encoders:
            hint = (
                " (objectives without distillation, e.g. the MR ablations, train no teacher)"
                if backbone == "teacher"
                else ""
            )
            raise ValueError(
                f"{self.path / WEIGHTS_FILE} has no {backbone} backbone{hint}: it holds {have}; "
                f"use --backbone {'student' if backbone == 'teacher' else 'teacher'}"
            )
        missing = [m for m in modalities if m not in self.encoders[backbone]]
        if missing:
            raise ValueError(
                f"{self.path / WEIGHTS_FILE} has no {backbone} {'/'.join(missing)} encoder (it holds {have}); "
                "choose another --modality"
            )


def load_export(path: Path) -> Export:
    """Read an export directory; every file is checked so a wrong path fails before any extraction."""
    import yaml
    from safetensors import safe_open

    for name in (WEIGHTS_FILE, MODEL_FILE, DATA_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: --export must be the export/ folder of a training run "
                "(`accelerate launch train.py` writes runs/<name>/export)"
            )
    raw = yaml.safe_load((path / MODEL_FILE).read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else "not a mapping"
        raise ValueError(
            f"{path / MODEL_FILE} is not a ModelConfig of this xkd (unknown fields: {extra}): the export was written "
            "by another version or for another architecture"
        )
    model = ModelConfig(**raw)
    data = json.loads((path / DATA_FILE).read_text())
    encoders: dict[str, set[str]] = {}
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            parts = key.split(".", 2)
            if len(parts) < 3 or parts[0] not in ("student", "teacher") or parts[1] not in ("video", "audio"):
                raise ValueError(
                    f"{path / WEIGHTS_FILE}: tensor {key!r} is not `<student|teacher>.<video|audio>.<name>`: "
                    "not an xkd export"
                )
            encoders.setdefault(parts[0], set()).add(parts[1])
    order = ("video", "audio")
    backbones = {b: tuple(m for m in order if m in ms) for b, ms in encoders.items()}
    digest = fingerprint_files([path / WEIGHTS_FILE, path / MODEL_FILE, path / DATA_FILE], content=True)
    return Export(path, model, data, backbones, digest)


def load_encoder(export: Export, backbone: str, modality: str) -> Encoder:
    """The `backbone` encoder of `modality`, weights from the export, in eval mode on the CPU."""
    from safetensors import safe_open

    export.require(backbone, [modality])
    encoder = build_encoder(export.model, modality)
    prefix = f"{backbone}.{modality}."
    with safe_open(export.path / WEIGHTS_FILE, framework="pt") as f:
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    expected = encoder.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        m = export.model
        raise ValueError(
            f"{export.path / WEIGHTS_FILE}: the {backbone} {modality} weights do not fit the encoder "
            f"{export.path / MODEL_FILE} describes (embed_dim={m.embed_dim}, depth={m.depth}, "
            f"num_heads={m.num_heads}): {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. "
            "The weights come from another architecture or size; keep each export's model.yaml with its weights"
        )
    encoder.load_state_dict(state)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------------------------
# Results: JSON, Markdown table, confusion matrix
# ---------------------------------------------------------------------------------------------------------------


def summarise(folds: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation of each metric over folds."""
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for metric in ("top1", "top5", "mAP"):
        values = np.array([f[metric] for f in folds], dtype=np.float64)
        out["mean"][metric], out["std"][metric] = float(values.mean()), float(values.std())
    return out


def markdown_table(result: dict[str, object]) -> str:
    """The results as a Markdown table (one row per fold plus the mean), with what was evaluated above it."""
    head = (
        f"**{result['benchmark']}** ({result['shards']}): probe `{result['probe']}`, protocol `{result['protocol']}`"
        f" ({result['selection']}), {result['modality']} features of the **{result['backbone']}** backbone of "
        f"`{result['export']}` (sha256 {str(result['export_sha256'])[:12]}), seed {result['seed']}"
    )
    rows = [
        "| fold | train videos | test videos | top-1 | top-5 | mAP | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in result["folds"]:
        chosen = ", ".join(f"{k}={v:g}" for k, v in f["chosen"].items())
        rows.append(
            f"| {f['fold']} | {f['n_train']} | {f['n_test']} | {f['top1']:.2f} | {f['top5']:.2f} | {f['mAP']:.2f} "
            f"| {chosen} |"
        )
    if len(result["folds"]) > 1:
        m, s = result["mean"], result["std"]
        rows.append(
            f"| **mean** | | | **{m['top1']:.2f}** ± {s['top1']:.2f} | {m['top5']:.2f} ± {s['top5']:.2f} "
            f"| {m['mAP']:.2f} ± {s['mAP']:.2f} | |"
        )
    notes = [f"- {n}" for f in result["folds"] for n in f["notes"]]
    return "\n".join([head, "", *rows, *([""] + notes if notes else [])]) + "\n"


def write_confusion_matrix(
    path: Path, scores: np.ndarray, labels: np.ndarray, classes: list[str], title: str
) -> None:
    """A row-normalised confusion matrix as a PNG (class names on the axes when there are few enough to read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    n = len(classes)
    cm = confusion_matrix(labels, scores.argmax(1), labels=np.arange(n)).astype(np.float64)
    cm /= np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + 0.25 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=6 if n > 20 else 8)
        ax.set_yticks(range(n), classes, fontsize=6 if n > 20 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict[str, object], out_dir: Path) -> tuple[Path, Path]:
    """`<name>.json` and `<name>.md` in `out_dir`; the name says benchmark, probe, modality, backbone, protocol."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "_".join(
        str(result[k]).replace("+", "") for k in ("benchmark", "probe", "modality", "backbone", "protocol")
    )
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown_table(result))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------------------------
# Feature extraction through the pipeline, with the cache
# ---------------------------------------------------------------------------------------------------------------


def export_data_config(export: Export) -> DataConfig:
    """The pretraining `DataConfig` from `data.json` (geometry, fps, mel statistics, evaluation resize)."""
    known = {f.name: f for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(export.data) - set(known))
    if unknown:
        raise ValueError(
            f"{export.path / DATA_FILE} has fields this xkd's DataConfig does not know ({unknown}): "
            "the export was written by another version"
        )
    # JSON has no tuples: give tuple-valued fields back their type.
    values = {
        k: tuple(v) if isinstance(v, list) and isinstance(known[k].default, tuple) else v
        for k, v in export.data.items()
    }
    data = DataConfig(**values)
    m = export.model
    for model_value, data_value, name in (
        (m.video_frames, data.video_frames, "video_frames"),
        (m.audio_mels, data.audio_mel_bins, "audio_mels / audio_mel_bins"),
        (m.audio_frames, data.audio_mel_frames, "audio_frames / audio_mel_frames"),
    ):
        if model_value != data_value:
            raise ValueError(
                f"{export.path}: model.yaml and data.json disagree on {name} ({model_value} vs {data_value}): "
                "the export's files do not belong together"
            )
    if data.mel_stats_from_dataset:
        raise ValueError(
            f"{export.path / DATA_FILE} says the pretraining normalised the mel with its dataset's own statistics "
            "but does not hold their values (mel_mean/mel_std): evaluation must use exactly the pretraining "
            "statistics; re-export the run with the resolved mel_mean/mel_std"
        )
    return data


def probe_data_config(
    export: Export, cfg: ProbeConfig, classes: list[str] | None, resolution: int
) -> DataConfig:
    """Evaluation geometry: the export's clip length, fps and mel statistics (always those of pretraining), the
    requested crop `resolution` with the short side resized in the pretraining proportion (128 -> 112, so
    256 -> 224), no local views."""
    base = export_data_config(export)
    return dataclasses.replace(
        base,
        shards=str(cfg.shards),
        classes=classes,
        require_audio=False,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        video_size=resolution,
        video_eval_resize=round(base.video_eval_resize * resolution / base.video_size),
        video_local_views=0,
        audio_local_views=0,
        short_clips="pad",  # training streams (bank, fine-tuning) must not drop short videos either
    )


def stream_workers(data: DataConfig, split: str, world_size: int) -> int:
    """Reader workers for a training stream: at most the shards per rank (the training split gives every worker
    whole shards), so that a small evaluation set in one or two shards still works."""
    from xkd.pipeline.shards import list_shards

    shards, _ = list_shards(data.shards, split)
    return min(data.num_workers, max(1, len(shards) // world_size))


def bank_data_config(data: DataConfig) -> DataConfig:
    """The paper's feature-bank augmentation (`xkd-method.md` 5.1): RandomResizedCrop with scale (0.08, 1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.2) always, grayscale p 0.2, no blur; audio volume jitter of +-10 %."""
    return dataclasses.replace(
        data,
        augment=True,
        video_global_scale=(0.08, 1.0),
        video_jitter_p=1.0,
        video_grayscale_p=0.2,
        video_blur_p=0.0,
        audio_global_gain=(0.9, 1.1),
    )


def check_resolution(index: ShardIndex, data: DataConfig) -> None:
    """Refuse to upsample: every video's short side must reach the resize that precedes the centre crop."""
    short = [min(s.width, s.height) for s in index.samples if s.has_video]
    if short and min(short) < data.video_eval_resize:
        raise ValueError(
            f"{index.root}: videos have a short side of {min(short)} px, but a {data.video_size}-px protocol resizes "
            f"the short side to {data.video_eval_resize} px first; xkd never upsamples silently. Re-shard with "
            f"`xkd-shard --short-side {data.video_eval_resize}` (256 for the paper's 224-px protocols), or choose "
            "a smaller --resolution"
        )


def extract(
    encoders: dict[str, Encoder],
    batches: Iterable[Batch],
    *,
    average: bool,
    device: torch.device,
    total: int | None,
    desc: str,
    limit: int | None = None,
) -> dict[str, Features]:
    """Pooled features of every batch row (mean of final-LN patch tokens, CLS excluded), averaged per key over the
    K clips x crops of a video when `average`, else kept per row (an augmented bank). Reads at most `limit` rows
    (an endless training stream needs one). Shows a progress bar."""
    from tqdm.auto import tqdm

    accumulators = {m: FeatureAccumulator(average) for m in encoders}
    # bf16 on GPUs (the pretraining precision); fp32 on the CPU, where bf16 matmuls are slow.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True) as bar:
        rows = 0
        for batch in batches:
            n = len(batch) if limit is None else min(len(batch), limit - rows)
            for modality, encoder in encoders.items():
                x = batch.video_global if modality == "video" else batch.audio_global
                if x is None:
                    raise ValueError(f"the loader gave no {modality} input for keys {batch.key[:3]}")
                with autocast:
                    features = encoder.forward_features(x[:n].to(device, non_blocking=True))
                accumulators[modality].add(batch.key[:n], features)
            rows += n
            bar.update(n)
            if limit is not None and rows >= limit:
                break
    return {m: acc.result() for m, acc in accumulators.items()}


_THROUGHPUT_FIELDS = (
    "shards",
    "batch_size",
    "num_workers",
    "dali_threads",
    "device_id",
    "augment_device",
    "with_video",
    "with_audio",
)


class FeatureStore:
    """Frozen features of one export backbone on one shard set, extracted through the pipeline and cached under
    `cache_dir/<hash>.npz`, the hash covering the export's content, the shards (names, sizes, mtimes), the
    selection and every extraction parameter, so a second probe on the same features costs seconds."""

    def __init__(
        self, cfg: ProbeConfig, export: Export, index: ShardIndex, data: DataConfig, device: torch.device
    ):
        self.cfg, self.export, self.index, self.data, self.device = cfg, export, index, data, device
        self.shards_sha = shards_fingerprint(cfg.shards)
        self._encoders: dict[str, Encoder] = {}
        self.extractions = 0
        """Extraction passes run (not served from the cache)."""

    def encoder(self, modality: str) -> Encoder:
        if modality not in self._encoders:
            self._encoders[modality] = load_encoder(self.export, self.cfg.backbone, modality).to(self.device)
        return self._encoders[modality]

    def features(
        self, kind: Literal["eval", "bank"], split: str, fold: int | None, modalities: Sequence[str], count: int,
        clips: int, crops: int, views: int,
    ) -> dict[str, Features]:  # fmt: skip
        """Features of the `split` (of `fold`) samples: `eval` = clips x crops averaged per key, `bank` = `views`
        augmented clips per video, one row each. `count` is the number of selected samples (progress bar)."""
        data = bank_data_config(self.data) if kind == "bank" else self.data
        params = dict(kind=kind, split=split, fold=fold, seed=self.cfg.seed if kind == "bank" else None)
        params |= dict(clips=clips, crops=crops) if kind == "eval" else dict(views=views)
        # Knobs that do not change the output (throughput, paths) stay out of the key; the bank's random stream
        # depends on the number of reader workers (one seeded stream each), so for banks that one stays in.
        skip = set(_THROUGHPUT_FIELDS) - ({"num_workers"} if kind == "bank" else set())
        data_key = {k: v for k, v in dataclasses.asdict(data).items() if k not in skip}
        out, todo = {}, {}
        for m in modalities:
            key = cache_key(
                export=self.export.sha256, backbone=self.cfg.backbone, modality=m, shards=self.shards_sha,
                data=data_key, **params,
            )  # fmt: skip
            path = self.cfg.cache_dir / f"features-{key}.npz"
            cached = load_cached(path) if self.cfg.use_cache else None
            if cached is None:
                todo[m] = path
            else:
                out[m] = cached
        if todo:
            fresh = self._extract(kind, data, split, fold, list(todo), count, clips, crops, views)
            for m, path in todo.items():
                save_cached(path, fresh[m])
                out[m] = fresh[m]
        return out

    def _extract(
        self, kind: str, data: DataConfig, split: str, fold: int | None, modalities: list[str], count: int,
        clips: int, crops: int, views: int,
    ) -> dict[str, Features]:  # fmt: skip
        from xkd.pipeline import make_eval_loader, make_train_loader

        self.extractions += 1
        data = dataclasses.replace(data, with_video="video" in modalities, with_audio="audio" in modalities)
        encoders = {m: self.encoder(m) for m in modalities}
        where = f"{split}" + (f" fold {fold}" if fold is not None else "")
        if kind == "eval":
            batches = make_eval_loader(data, split, fold, clips, crops, 0, 1)
            return extract(
                encoders, batches, average=True, device=self.device, total=count * clips * crops,
                desc=f"features {'+'.join(modalities)} {where}",
            )  # fmt: skip
        # The bank is the first `views` x samples clips of the training stream (random windows and crops, the
        # augmentation above): each video contributes `views` augmented clips on average.
        data = dataclasses.replace(data, split=split, fold=fold, num_workers=stream_workers(data, split, 1))
        stream = make_train_loader(data, 0, 1, self.cfg.seed, 0)
        return extract(
            encoders, stream, average=False, device=self.device, total=views * count, limit=views * count,
            desc=f"feature bank {'+'.join(modalities)} {where}",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# One evaluation run: plan, frozen probes per fold, results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one evaluation run does, resolved from the config, the benchmark table, the export and the shards."""

    benchmark: str
    modality: str
    modalities: tuple[str, ...]
    folds: list[int | None]
    classes: list[str] | None
    train_views: int
    test_clips: int
    test_crops: int
    resolution: int
    svm_costs: list[float]
    supervised: bool
    """Fine-tuning or the FC protocol (a training loop over fresh clips), else a probe on cached features."""
    selection: str
    """How hyper-parameters were chosen, in words (recorded in the results)."""


def make_plan(cfg: ProbeConfig, export: Export, index: ShardIndex) -> tuple[Plan, ShardIndex]:
    """Resolve `auto` values and the benchmark's paper values; returns the plan and the (class-subset) index."""
    name = cfg.benchmark
    if name == "auto":
        name = "demo" if is_demo(index) else _DATASET_BENCHMARK.get(index.dataset, "generic")
    bench = BENCHMARKS[name]
    classes = None
    if cfg.classes is not None:
        classes = [line.strip() for line in cfg.classes.read_text().splitlines() if line.strip()]
    elif bench.classes is not None:
        classes = list(bench.classes)
    if classes is not None:
        index = select_classes(index, classes)
        classes = index.classes  # the shards' spelling, which the pipeline matches against `label_name`
    modality = cfg.modality if cfg.modality != "auto" else bench.modality
    if not index.has_video and modality != "audio":
        if cfg.modality != "auto":
            raise ValueError(f"{index.root} holds audio-only samples: --modality {cfg.modality} needs video")
        modality = "audio"
    modalities = ("video", "audio") if modality == "audio+video" else (modality,)
    folds: list[int | None] = list(cfg.folds) if cfg.folds else (index.folds() or [None])
    finetune = cfg.probe == "finetune"
    supervised = finetune or (cfg.probe == "linear" and cfg.protocol != "default")
    # Fine-tuning and the Kinetics-400 FC protocol run at twice the pretraining crop (the paper's 224 px).
    paper_224 = finetune or (supervised and name == "kinetics400")
    resolution = cfg.resolution or export.model.video_size * (2 if paper_224 else 1)
    if cfg.probe == "knn":
        selection = f"k by leave-one-video-out accuracy on the train split (grid {cfg.knn_ks})"
    elif cfg.protocol == "release":
        what = "SVM cost" if cfg.probe == "svm" else "epoch"
        selection = f"RELEASE PROTOCOL: {what} chosen on the TEST split (optimistic; not a clean estimate)"
    elif not supervised:
        what = "SVM cost" if cfg.probe == "svm" else "weight decay"
        selection = f"{what} by {cfg.cv_folds}-fold grouped cross-validation on the train split"
    else:
        selection = "fixed recipe, last epoch reported"
    plan = Plan(
        benchmark=name, modality=modality, modalities=modalities, folds=folds, classes=classes,
        train_views=cfg.train_views or bench.train_views, test_clips=cfg.test_clips or bench.test_clips,
        test_crops=cfg.test_crops or (3 if supervised else 1), resolution=resolution,
        svm_costs=list(cfg.svm_costs or bench.svm_costs), supervised=supervised, selection=selection,
    )  # fmt: skip
    return plan, index


def frozen_probe(
    cfg: ProbeConfig,
    plan: Plan,
    store: FeatureStore,
    fold: int | None,
    train: list[SampleMeta],
    test: list[SampleMeta],
) -> tuple[ProbeOutput, np.ndarray, int, int]:
    """Linear (feature bank), SVM or kNN on frozen features of one fold.

    Returns the probe output, the test labels (one per test video), and the numbers of train and test videos."""
    index, n_classes = store.index, len(store.index.classes)
    label = {s.key: s.label for s in index.samples}
    test_split = "test" if fold is not None else test[0].split
    common = dict(fold=fold, modalities=plan.modalities, clips=plan.test_clips, crops=plan.test_crops)
    test_f = combine(store.features("eval", test_split, count=len(test), views=0, **common), plan.modality)
    test_groups, x_test = group_mean(test_f.values, np.array([index.group(k) for k in test_f.keys]))
    group_label = {index.group(k): label[k] for k in test_f.keys}
    y_test = np.array([group_label[g] for g in test_groups])
    notes = []
    if len(set(test_f.keys.tolist())) < len(test):
        notes.append(f"{len(test) - len(set(test_f.keys.tolist()))} test samples were unreadable and skipped")
    if cfg.probe == "knn":
        train_f = combine(store.features("eval", "train", count=len(train), views=0, **common), plan.modality)
        groups, x_train = group_mean(train_f.values, np.array([index.group(k) for k in train_f.keys]))
        train_label = {index.group(k): label[k] for k in train_f.keys}
        y_train = np.array([train_label[g] for g in groups])
        knn = dict(n_classes=n_classes, ks=cfg.knn_ks, temperature=cfg.knn_temperature)
        out = fit_knn(x_train, y_train, groups, x_test, **knn)
    else:
        bank = combine(
            store.features("bank", "train", count=len(train), views=plan.train_views, **common), plan.modality
        )
        groups = np.array([index.group(k) for k in bank.keys])
        y_bank = np.array([label[k] for k in bank.keys])
        covered = len(set(bank.keys.tolist()))
        if covered < len(train):  # the training stream draws videos at random: a small bank can miss some
            notes.append(
                f"the feature bank ({len(bank.keys)} clips) holds {covered} of the {len(train)} training videos"
            )
        if cfg.probe == "svm":
            out = fit_svm(
                bank.values, y_bank, groups, x_test, n_classes=n_classes, costs=plan.svm_costs, n_splits=cfg.cv_folds,
                max_iter=cfg.svm_max_iter, seed=cfg.seed, n_jobs=cfg.num_workers,
                y_test=y_test if cfg.protocol == "release" else None,
            )  # fmt: skip
        else:
            out = fit_linear(
                bank.values, y_bank, groups, x_test, n_classes=n_classes, weight_decays=cfg.linear_weight_decays,
                n_splits=cfg.cv_folds, epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                warmup_epochs=cfg.linear_warmup_epochs, batch_size=cfg.linear_batch_size, seed=cfg.seed,
                device=str(store.device),
            )  # fmt: skip
    out.notes = notes + out.notes
    return out, y_test, len({index.group(s.key) for s in train}), len(y_test)


def run_probe(cfg: ProbeConfig) -> dict[str, object]:
    """Evaluate the export on the shards as `cfg` says; writes and returns the result record."""
    import time

    started = time.time()
    export = load_export(cfg.export)
    index = read_index(cfg.shards, cfg.cache_dir if cfg.use_cache else None)
    check_labels(index)
    plan, index = make_plan(cfg, export, index)
    export.require(cfg.backbone, plan.modalities)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = probe_data_config(export, cfg, plan.classes, plan.resolution)
    if "video" in plan.modalities:
        check_resolution(index, data)
    store = FeatureStore(cfg, export, index, data, device)
    results_dir = cfg.results_dir or cfg.export.parent / "eval"
    folds = []
    for fold in plan.folds:
        train, test = fold_split(index, fold, cfg.test_split)
        probe = supervised_probe if plan.supervised else frozen_probe
        out, y_test, n_train, n_test = probe(cfg, plan, store, fold, train, test)
        record = {"fold": fold if fold is not None else "-", "n_train": n_train, "n_test": n_test}
        record |= fold_metrics(out.scores, y_test) | {"chosen": out.chosen, "selection": out.selection}
        folds.append(record | {"notes": out.notes})
        if cfg.confusion_matrix and PartialState().is_main_process:
            png = results_dir / f"confusion_{plan.benchmark}_{cfg.probe}_fold{record['fold']}.png"
            results_dir.mkdir(parents=True, exist_ok=True)
            write_confusion_matrix(
                png, out.scores, y_test, index.classes, f"{plan.benchmark} fold {record['fold']}"
            )
    result: dict[str, object] = {
        "benchmark": plan.benchmark, "dataset": index.dataset, "shards": str(cfg.shards), "n_classes": len(index.classes),
        "export": str(cfg.export), "export_sha256": export.sha256, "backbone": cfg.backbone, "modality": plan.modality,
        "probe": cfg.probe, "protocol": cfg.protocol, "selection": plan.selection, "seed": cfg.seed,
        "resolution": plan.resolution, "train_views": plan.train_views, "test_clips": plan.test_clips,
        "test_crops": plan.test_crops, "folds": folds, **summarise(folds), "device": str(device),
        "feature_extractions": store.extractions, "seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "sklearn": _version("scikit-learn"), "xkd": _version("xkd")},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }  # fmt: skip
    if PartialState().is_main_process:  # several processes only under `accelerate launch` (fine-tuning)
        json_path, md_path = write_results(result, results_dir)
        print(markdown_table(result))
        print(f"results: {json_path} and {md_path}", file=sys.stderr)
    return result


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Supervised protocols on train.py's machinery: full fine-tuning, and the paper's FC protocol (frozen backbone)
# ---------------------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Encoder + linear head on the pooled feature (mean of final-LN patch tokens). `frozen` keeps the encoder in
    eval mode without gradients (the FC protocol); `normalise` L2-normalises the feature (the ESC-50 head)."""

    def __init__(
        self,
        encoder: Encoder,
        n_classes: int,
        dropout: float,
        frozen: bool,
        normalise: bool,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.encoder, self.frozen, self.normalise = encoder, frozen, normalise
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.embed_dim, n_classes)
        with torch.no_grad():
            nn.init.orthogonal_(self.head.weight, generator=generator)  # the release's head init
            self.head.bias.zero_()
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, n_classes) logits."""
        if self.frozen:
            with torch.no_grad():
                features = self.encoder.forward_features(x)
        else:
            features = self.encoder.forward_features(x)
        if self.normalise:
            features = nn.functional.normalize(features, dim=-1)
        return self.head(self.dropout(features))


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, object]]:
    """BEiT-style parameter groups: block i gets lr x layer_decay^(depth - i), the embeddings layer_decay^(depth
    + 1), the final norm and head the full lr; no weight decay on biases, 1-D parameters, pos_embed, cls_token."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, object]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in ("encoder.pos_embed", "encoder.cls_token")
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, *, mixup: float, cutmix: float, smoothing: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mixup / CutMix with label smoothing (timm's `Mixup`, batch mode, switch probability 0.5): each batch is mixed
    with its reverse. CutMix cuts one box over the last two axes (H, W for video, the same box in every frame;
    F, T for a spectrogram). Returns the mixed input and (B, n_classes) soft targets."""
    off = smoothing / n_classes
    one_hot = torch.full((len(y), n_classes), off, device=x.device).scatter_(
        1, y[:, None], 1.0 - smoothing + off
    )
    if mixup <= 0 and cutmix <= 0:
        return x, one_hot
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample().item()) if alpha > 0 else 1.0
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = (int(torch.randint(0, n, (), generator=generator)) for n in (h, w))
        y0, y1, x0, x1 = (
            max(cy - ch // 2, 0),
            min(cy + ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw // 2, w),
        )
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        # The area actually pasted: the box is clipped at the borders.
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + flipped * (1.0 - lam)
    return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def augment_video(x: torch.Tensor, ops: int, magnitude: int, erasing: float) -> torch.Tensor:
    """RandAugment (`rand-m{magnitude}-n{ops}`, magnitude out of 10) and random erasing (pixel mode) per clip of a
    (B, 3, T, H, W) ImageNet-normalised batch; one draw per clip, applied to all its frames. torchvision's
    RandAugment stands in for timm's (its magnitude noise `mstd0.5` is not reproduced)."""
    from torchvision.transforms import v2

    from xkd.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1, 1)
    rand_augment = v2.RandAugment(num_ops=ops, magnitude=magnitude, num_magnitude_bins=11)
    erase = v2.RandomErasing(p=erasing, value="random")
    out = []
    for clip in x:
        frames = (clip * std + mean).clamp(0, 1).transpose(0, 1)  # (T, 3, H, W) in [0, 1]
        frames = (rand_augment(frames).transpose(0, 1) - mean) / std  # back to (3, T, H, W), normalised
        out.append(erase(frames.transpose(0, 1)).transpose(0, 1))
    return torch.stack(out)


def augment_audio(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ESC-50 fine-tuning masks (`xkd-method.md` 5.3): two frequency masks of width [0, 10) and two time masks
    of width [0, 20) per spectrogram of a (B, 1, F, T) normalised batch, filled with the mean (0 after
    normalisation). The release's time warp is not reproduced."""
    x = x.clone()
    for row in x:  # (1, F, T)
        for axis, width in ((1, 10), (1, 10), (2, 20), (2, 20)):
            size = row.shape[axis]
            w = int(torch.randint(0, min(width, size), (), generator=generator))
            start = int(torch.randint(0, size - w + 1, (), generator=generator))
            row.narrow(axis, start, w).zero_()
    return x


def _or(value: float | None, default: float) -> float:
    """`value` unless it is None (0 is a valid override, so `or` would be wrong)."""
    return default if value is None else value


def supervised_data(cfg: ProbeConfig, data: DataConfig, finetune: bool, video: bool) -> DataConfig:
    """The training stream of the supervised protocols (`xkd-method.md` 5.2, 5.3)."""
    data = dataclasses.replace(data, with_video=video, with_audio=not video)
    if finetune and video:  # geometric views only; RandAugment, erasing and mixing run on the batch
        return dataclasses.replace(data, augment=False, video_global_scale=(0.2, 0.766))
    if finetune:  # ESC-50: volume jitter +-20 %; the masks run on the batch
        return dataclasses.replace(data, augment=True, audio_global_gain=(0.8, 1.2))
    # The FC protocol: RandomResizedCrop (0.08, 1), flip, colour jitter; audio (FSD50K) volume jitter +-10 %.
    return dataclasses.replace(
        data, augment=True, video_global_scale=(0.08, 1.0), video_jitter_p=1.0, video_grayscale_p=0.0,
        video_blur_p=0.0, audio_global_gain=(0.9, 1.1),
    )  # fmt: skip


def supervised_probe(
    cfg: ProbeConfig, plan: Plan, store: FeatureStore, fold: int | None, train: list[SampleMeta], test: list[SampleMeta]
) -> tuple[ProbeOutput, np.ndarray, int, int]:  # fmt: skip
    """Full fine-tuning (`--probe finetune`) or the paper's FC protocol (`--probe linear --protocol paper|release`:
    a linear head on the frozen backbone, fresh augmented clips at every step) for one fold.

    Built on train.py's machinery: a `TrainConfig` holds the schedule and `train.lr_at` computes the warmup +
    cosine learning rate per optimizer step exactly as in pretraining; Accelerate runs devices and processes
    (`accelerate launch eval.py ...` for several GPUs); the pipeline's training stream is split per rank (never
    through `accelerator.prepare`); a non-finite loss stops with train.py's `NonFiniteLossError`. Test: clips x
    crops per video, softmax averaged; `release` evaluates after every epoch and reports the best one.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import train as trainer  # imported here: train.py may import eval.py for its periodic kNN probe
    from xkd.pipeline import make_train_loader

    if plan.modality == "audio+video":
        raise ValueError(
            f"--probe {cfg.probe} --protocol {cfg.protocol} takes one modality: --modality video or audio"
        )
    finetune, video = cfg.probe == "finetune", plan.modality == "video"
    bench, export, n_classes = BENCHMARKS[plan.benchmark], store.export, len(store.index.classes)
    bf16 = store.device.type == "cuda" and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=store.device.type == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    batch_size = int(_or(cfg.ft_batch_size, bench.ft_batch_size)) if finetune else cfg.linear_batch_size
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
    epochs = cfg.ft_epochs if finetune else cfg.linear_epochs
    warmup = _or(cfg.ft_warmup_epochs, bench.ft_warmup_epochs) if finetune else cfg.linear_warmup_epochs
    if not 0 <= warmup < epochs:
        prefix = "ft" if finetune else "linear"
        raise ValueError(
            f"--{prefix}_warmup_epochs ({warmup}) must be smaller than --{prefix}_epochs ({epochs})"
        )
    schedule = trainer.TrainConfig(
        name=f"{cfg.probe}-{plan.benchmark}", model=export.model, data=export_data_config(export), trackers=[],
        epochs=epochs, warmup_epochs=warmup, batch_size=batch_size, seed=cfg.seed,
        lr=_or(cfg.ft_lr, bench.ft_lr) if finetune else cfg.linear_lr,
        weight_decay=_or(cfg.ft_weight_decay, bench.ft_weight_decay) if finetune else 0.0, betas=(0.9, 0.999),
    )  # fmt: skip
    model = Classifier(
        load_encoder(export, cfg.backbone, plan.modality), n_classes, dropout=cfg.ft_dropout if finetune else 0.0,
        frozen=not finetune, normalise=finetune and not video, generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    if finetune:
        groups = layer_decay_groups(
            model, schedule.weight_decay, _or(cfg.ft_layer_decay, bench.ft_layer_decay)
        )
    else:  # the paper's FC head: no weight decay
        groups = [{"params": list(model.head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}]
    model, optimizer = accelerator.prepare(
        model, torch.optim.AdamW(groups, lr=schedule.lr, betas=schedule.betas)
    )
    mix = dict(
        mixup=_or(cfg.ft_mixup, bench.ft_mixup) if finetune else 0.0,
        cutmix=_or(cfg.ft_cutmix, bench.ft_cutmix) if finetune else 0.0,
        smoothing=cfg.ft_label_smoothing if finetune else 0.0,
    )
    data = supervised_data(cfg, store.data, finetune, video)
    data = dataclasses.replace(
        data,
        split="train",
        fold=fold,
        batch_size=batch_size // world,
        num_workers=stream_workers(data, "train", world),
    )
    stream = make_train_loader(data, rank, world, cfg.seed, 0)
    generator = torch.Generator().manual_seed(cfg.seed * 1009 + rank)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = math.ceil(schedule.epochs * steps_per_epoch)
    per_epoch: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    model.train()
    bar = tqdm(
        range(total_steps), desc=f"{cfg.probe} fold {fold or '-'}", disable=not accelerator.is_main_process
    )
    for step in bar:
        batch = next(stream).to(accelerator.device)
        x = batch.video_global if video else batch.audio_global
        if finetune and video:
            x = augment_video(x, cfg.ft_randaugment_ops, cfg.ft_randaugment_magnitude, cfg.ft_random_erasing)
        elif finetune:
            x = augment_audio(x, generator)
        x, target = mix_batch(x, batch.label, n_classes, generator=generator, **mix)
        lr = trainer.lr_at(schedule, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with accelerator.autocast():
            logits = model(x)
        loss = torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0 or step + 1 == total_steps:  # the only host syncs
            if not math.isfinite(value := loss.item()):
                raise trainer.NonFiniteLossError(
                    f"non-finite {cfg.probe} loss at step {step}: lower the learning rate"
                )
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % steps_per_epoch == 0 and (cfg.protocol == "release" or step + 1 == total_steps):
            per_epoch[(step + 1) // steps_per_epoch] = _test_scores(
                accelerator, model, store, plan, fold, test
            )
            model.train()
    bar.close()
    if total_steps % steps_per_epoch:  # a fractional last epoch
        per_epoch[math.ceil(schedule.epochs)] = _test_scores(accelerator, model, store, plan, fold, test)
    accuracy = {e: 100 * topk_accuracy(scores, labels, 1) for e, (scores, labels) in per_epoch.items()}
    epoch = max(accuracy, key=lambda e: (accuracy[e], e)) if cfg.protocol == "release" else max(accuracy)
    scores, y_test = per_epoch[epoch]
    selection = {f"epoch={e}": a for e, a in accuracy.items()} if cfg.protocol == "release" else {}
    return ProbeOutput(scores, {"epoch": epoch}, selection), y_test, len(train), len(y_test)


def _test_scores(
    accelerator: object, model: nn.Module, store: FeatureStore, plan: Plan, fold: int | None, test: list[SampleMeta]
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Softmax averaged over each test video's clips x crops (and over the windows of one source), gathered from
    every process: (scores (N, C), labels (N,)), one row per test video."""
    from accelerate.utils import gather_object

    from xkd.pipeline import make_eval_loader

    video = plan.modality == "video"
    data = dataclasses.replace(store.data, with_video=video, with_audio=not video)
    split = "test" if fold is not None else test[0].split
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = make_eval_loader(data, split, fold, plan.test_clips, plan.test_crops, rank, world)
    accumulator = FeatureAccumulator(average=True)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                logits = model(batch.video_global if video else batch.audio_global)
            accumulator.add(batch.key, torch.softmax(logits.float(), dim=-1))
    # Each key lives on exactly one rank (the evaluation split is by key), so gathering concatenates.
    parts = [p for p in gather_object([accumulator.result()]) if len(p.keys)]
    keys = np.concatenate([p.keys for p in parts])
    groups, scores = group_mean(
        np.concatenate([p.values for p in parts]), np.array([store.index.group(k) for k in keys])
    )
    label = {store.index.group(s.key): s.label for s in test}
    return scores, np.array([label[g] for g in groups])


# ---------------------------------------------------------------------------------------------------------------
# --extract: embeddings of a user's own videos
# ---------------------------------------------------------------------------------------------------------------


def run_extract(cfg: ProbeConfig) -> Path:
    """Embeddings of every input video as a Parquet file, one row per input video (per source, when xkd-shard cut
    long sources into windows: their features are averaged).

    A folder with `dataset.json` is read as shards; any other folder is first sharded with xkd-shard (at the
    export's fps and a short side that needs no upsampling) into a temporary directory. Columns: `key`, `source`,
    `split`, `label`, `label_name`, `status` (`ok`, or `failed` with the `reason` for inputs xkd-shard could not
    read, whose embeddings are null), then one list<float32> column per modality, `<modality>_embedding`.
    """
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    export = load_export(cfg.export)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolution = cfg.resolution or export.model.video_size
    if not cfg.extract.is_dir():
        raise FileNotFoundError(f"--extract {cfg.extract}: not a directory of videos or of shards")
    with tempfile.TemporaryDirectory(prefix="xkd-extract-") as tmp:
        failed: list[dict[str, object]] = []
        run_cfg = dataclasses.replace(cfg, shards=cfg.extract)
        if not (cfg.extract / "dataset.json").is_file():
            # Temporary shards: their features go to a temporary cache too (a new fingerprint every run).
            run_cfg = dataclasses.replace(cfg, shards=Path(tmp) / "shards", cache_dir=Path(tmp) / "cache")
            failed = shard_sources(cfg.extract, run_cfg.shards, export, resolution)
        index = read_index(run_cfg.shards)
        if cfg.modality == "auto":
            modalities = tuple(
                m for m in export.encoders.get(cfg.backbone, ()) if m != "video" or index.has_video
            )
        else:
            modalities = ("video", "audio") if cfg.modality == "audio+video" else (cfg.modality,)
        export.require(cfg.backbone, modalities)
        data = probe_data_config(export, run_cfg, None, resolution)
        if "video" in modalities:
            check_resolution(index, data)
        store = FeatureStore(run_cfg, export, index, data, device)
        clips, crops = cfg.test_clips or 3, cfg.test_crops or 1
        features: dict[str, dict[str, np.ndarray]] = {m: {} for m in modalities}
        for split, fold in _all_selections(index):
            selected = members(index, split, fold)
            if all(s.key in features[modalities[0]] for s in selected):
                continue  # fold datasets: an earlier fold already covered these samples
            for m, f in store.features(
                "eval", split, fold, modalities, len(selected), clips, crops, 0
            ).items():
                features[m].update(zip(f.keys.tolist(), f.values))
    rows = _embedding_rows(index, features, modalities) + [row | dict.fromkeys(modalities) for row in failed]
    table = {
        c: [r[c] for r in rows] for c in ("key", "source", "split", "label", "label_name", "status", "reason")
    }
    for m in modalities:
        table[f"{m}_embedding"] = pa.array([r[m] for r in rows], type=pa.list_(pa.float32()))
    metadata = {
        "export": str(cfg.export), "export_sha256": export.sha256, "backbone": cfg.backbone, "resolution": resolution,
        "test_clips": clips, "test_crops": crops, "pooling": "mean of final-LN patch tokens, CLS excluded",
    }  # fmt: skip
    out = pa.table(table).replace_schema_metadata({f"xkd.{k}": str(v) for k, v in metadata.items()})
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, cfg.out)
    print(
        f"{cfg.out}: {len(rows)} videos ({len(failed)} failed), {', '.join(modalities)} embeddings",
        file=sys.stderr,
    )
    return cfg.out


def shard_sources(src: Path, out: Path, export: Export, resolution: int) -> list[dict[str, object]]:
    """Shard the media files under `src` with xkd-shard (the export's fps, a short side that needs no upsampling)
    and return a row for every input it could not read."""
    import pyarrow.parquet as pq

    from xkd.sharding import cli

    data = export_data_config(export)
    short_side = round(data.video_eval_resize * resolution / data.video_size)
    short_side += short_side % 2  # xkd-shard writes even sizes
    # --max-failed 1: a bad input must not abort the others; it becomes a row with status `failed`.
    status = cli.main(["--src", str(src), "--out", str(out), "--fps", f"{data.video_fps:g}",
                       "--short-side", str(short_side), "--max-failed", "1"])  # fmt: skip
    if status != 0:
        raise ValueError(f"xkd-shard could not shard {src} (exit status {status}; its message is above)")
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    return [
        {"key": r["key"], "source": r["source"], "split": r["split"], "label": r["label"], "label_name": r["label_name"],
         "status": r["status"], "reason": r["reason"]}
        for r in manifest
        if r["status"] != "ok"
    ]  # fmt: skip


def _all_selections(index: ShardIndex) -> list[tuple[str, int | None]]:
    """(split, fold) selections that together cover every sample: each split, or each fold's train and test."""
    folds = index.folds()
    if folds:
        return [(split, fold) for fold in folds for split in ("train", "test")]
    return [(split, None) for split in sorted({s.split for s in index.samples})]


def _embedding_rows(
    index: ShardIndex, features: dict[str, dict[str, np.ndarray]], modalities: Sequence[str]
) -> list[dict[str, object]]:
    """One row per source video: its samples' features averaged (windows of a long source share a group)."""
    by_group: dict[str, list[SampleMeta]] = {}
    for s in index.samples:
        by_group.setdefault(index.group(s.key), []).append(s)
    rows = []
    for group, samples in by_group.items():
        first = samples[0]
        row: dict[str, object] = {
            "key": group, "source": first.source.split("#", 1)[0], "split": first.split, "label": first.label,
            "label_name": first.label_name, "status": "ok", "reason": "",
        }  # fmt: skip
        for m in modalities:
            vectors = [features[m][s.key] for s in samples if s.key in features[m]]
            row[m] = np.mean(vectors, axis=0).astype(np.float32).tolist() if vectors else None
        if any(row[m] is None for m in modalities):
            row |= {"status": "failed", "reason": "unreadable in the shards (skipped by the loader)"}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_config(argv: list[str] | None = None) -> ProbeConfig:
    """`ProbeConfig` from the command line (`--config file.yaml` first, then flags such as `--probe svm`)."""
    from jsonargparse import auto_cli, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return auto_cli(ProbeConfig, args=sys.argv[1:] if argv is None else argv, as_positional=False)


def main(argv: list[str] | None = None) -> dict[str, object] | Path:
    """Run a probe (returns the result record) or, with `--extract`, write embeddings (returns the Parquet path)."""
    cfg = parse_config(argv)
    return run_extract(cfg) if cfg.extract is not None else run_probe(cfg)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: the message says what to do, no traceback
        sys.exit(f"eval.py: error: {err}")
