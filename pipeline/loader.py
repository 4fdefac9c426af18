"""Loader builders: shards -> `Batch` for training and evaluation, on the DALI or the portable PyAV path.

Wires the stages of `shards.py`, `views.py`, `audio.py`, `augment.py` and one of the two video decoders into the
loaders of `../shared/contracts.md` ("Reading shards"): the reader runs in torch DataLoader workers (training:
shards split by rank then worker and resampled; evaluation: samples split by key hash over ranks x workers), and
either decodes the video itself with PyAV (`decode.py`) or hands the encoded bytes to a DALI pipeline (`dali.py`).
Both paths consume the same random draws in the same order, so for a given (seed, step, rank) they yield the same
samples, windows and augmentations. These loaders are never passed through `accelerator.prepare`.

Backend choice (`DataConfig.backend`):
- `auto`: DALI if `nvidia.dali` imports (decoder `mixed` when CUDA is available, else `cpu`), else `pyav`;
- `dali`: DALI, decoder per `DataConfig.dali_device`; `pyav`: the portable path.
Audio-only data never needs a video decoder, so it always runs on the reader alone.

Photometric augmentation and normalisation run once per batch, where `DataConfig.augment_device` says
(`augment_device`): on the GPU whenever there is one (the decoded uint8 views go there, so the CPU only decodes and
cuts views), otherwise in the PyAV reader workers (beside the decoding, in parallel with the trainer) or in the main
process on DALI `cpu`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xkd.pipeline.audio import audio_views
from xkd.pipeline.augment import augmented_batch, collate_photometric, draw_photometric
from xkd.pipeline.batch import Batch
from xkd.pipeline.config import DataConfig
from xkd.pipeline.decode import DecodeError, decode_frames, stack_views, video_views
from xkd.pipeline.memory import keep_freed_memory
from xkd.pipeline.shards import (
    Sample,
    Selection,
    SkipCounter,
    batched,
    decode_members,
    list_shards,
    read_tar,
    resample,
    shuffle,
    split_shards,
)
from xkd.pipeline.views import View, draw_train_views, eval_views, start_range
from xkd.sharding.schema import VIDEO_EXT, SampleMeta

DATASET_JSON = "dataset.json"


def dataset_info(shards: str | Path) -> dict:
    """The parsed `dataset.json` of a shard directory (classes, counts per split/fold, parameters, mel stats)."""
    path = Path(shards) / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {shards} a directory written by xkd-shard?")
    return json.loads(path.read_text())


def mel_stats(cfg: DataConfig) -> tuple[float, float]:
    """(mean, std) that normalise the log-mel: the config's (the paper's Kinetics statistics by default), or with
    `mel_stats_from_dataset` the shards' own, from `dataset.json`'s `mel_stats` (count / sum / sum of squares) of
    the pretraining group `train` (fold-1 train for fold datasets), else of `all`."""
    if not cfg.mel_stats_from_dataset:
        return cfg.mel_mean, cfg.mel_std
    groups = dataset_info(cfg.shards).get("mel_stats") or {}
    stats = groups.get("train") or groups.get("all")
    if not stats or not stats["count"]:
        raise ValueError(f"{cfg.shards}/{DATASET_JSON} holds no mel statistics: set mel_mean/mel_std instead")
    count, total, total_sq = float(stats["count"]), float(stats["sum"]), float(stats["sumsq"])
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))


def resolve_backend(cfg: DataConfig) -> str:
    """`dali-mixed`, `dali-cpu` or `pyav`, following `DataConfig.backend` and `dali_device` (see module doc)."""
    if cfg.backend == "pyav":
        return "pyav"
    try:
        import xkd.pipeline.dali  # noqa: F401  (only checks that DALI imports)
    except ImportError as err:
        if cfg.backend == "dali":
            raise ImportError(
                f"DataConfig.backend='dali' but DALI does not import ({err}): pip install 'xkd[dali]' "
                "(nvidia-dali-cuda130, Linux only) or use backend='pyav'"
            ) from err
        return "pyav"
    device = cfg.dali_device
    if device == "auto":
        device = "mixed" if torch.cuda.is_available() else "cpu"
    if device == "mixed" and not torch.cuda.is_available():
        raise RuntimeError("DataConfig.dali_device='mixed' needs a CUDA GPU: use dali_device='cpu' or 'auto'")
    return f"dali-{device}"


def augment_device(cfg: DataConfig, backend: str) -> torch.device | None:
    """The device on which the main process augments and normalises the decoded video views (see
    `DataConfig.augment_device`), or None when the PyAV reader workers do it themselves."""
    choice = "cuda" if backend == "dali-mixed" else cfg.augment_device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return None if backend == "pyav" else torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "DataConfig.augment_device='cuda' needs a CUDA GPU: use augment_device='cpu' or 'auto'"
        )
    return torch.device("cuda", torch.cuda.current_device() if cfg.device_id is None else cfg.device_id)


@dataclass
class ReadPlan:
    """Everything a reader worker needs (picklable): what to read, how to split it, and what to produce."""

    cfg: DataConfig
    shards: list[str]
    selection: Selection
    train: bool
    rank: int
    world_size: int
    seed: tuple[int, ...]
    with_video: bool
    with_audio: bool
    decode_video: bool
    """Decode video in the reader with PyAV (else the DALI path gets the encoded bytes)."""
    augment_device: torch.device | None
    """Where the main process augments and normalises the views (`augment_device`); None: the PyAV reader does."""
    mel_mean: float
    mel_std: float
    clips: int = 1
    crops: int = 1


class ReaderDataset(IterableDataset):
    """The shard reader as a torch IterableDataset: yields (batch, worker id, skip counts) tuples, where batch is
    a finished `Batch` (audio-only data; PyAV path augmenting in the reader), a dict of the uint8 PyAV views and
    the other fields (PyAV path augmenting in the main process) or a dict with the DALI feed (DALI path)."""

    def __init__(self, plan: ReadPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[Batch | dict, int, dict[str, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # a process of our own: its allocator policy is ours to set
            keep_freed_memory()
        plan, cfg = self.plan, self.plan.cfg
        skips = SkipCounter(cfg.max_consecutive_skips)
        read_rng, view_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence([*plan.seed, worker]).spawn(2)
        )
        if plan.train:
            shards = split_shards(plan.shards, plan.rank, plan.world_size, worker, workers)
            samples = read_tar(resample(shards, read_rng), skips, keep=plan.selection, resampled=True)
            samples = shuffle(self._checked(samples, skips), cfg.shuffle_buffer, read_rng)
            rows = (row for sample in samples for row in self._rows(sample, view_rng, skips))
            for group in batched(rows, cfg.batch_size):
                yield self._collate(group), worker, dict(skips.counts)
        else:
            parts = plan.world_size * workers
            keep = dataclasses.replace(plan.selection, part=plan.rank * workers + worker, parts=parts)
            samples = self._checked(read_tar(plan.shards, skips, keep=keep), skips)
            for group in batched(samples, cfg.batch_size):
                rows = [row for sample in group for row in self._rows(sample, None, skips)]
                if rows:
                    yield self._collate(rows), worker, dict(skips.counts)

    def _checked(self, samples: Iterator[Sample], skips: SkipCounter) -> Iterator[Sample]:
        plan = self.plan
        return decode_members(samples, skips, plan.cfg.audio_mel_bins, plan.with_video, plan.with_audio)

    def _rows(self, sample: Sample, rng: np.random.Generator | None, skips: SkipCounter) -> list[dict]:
        """The batch rows of one sample: 1 in training (random views), clips x crops in evaluation (rng None)."""
        plan, cfg = self.plan, self.plan.cfg
        meta = sample["meta"]
        assert isinstance(meta, SampleMeta)
        shard, key = str(sample["__shard__"]), str(sample["__key__"])
        try:
            last = start_range(meta, cfg, plan.with_video, plan.with_audio)
        except ValueError as err:
            skips.skip(shard, key, "frame rate", str(err))
            return []
        if rng is not None:
            if last < 0 and cfg.short_clips == "skip":
                skips.skip(
                    shard, key, "short clip", f"{meta.duration_s:.2f} s, the window is {cfg.clip_seconds:g} s"
                )
                return []
            views = [draw_train_views(rng, meta, cfg, plan.with_video, plan.with_audio)]
        else:
            views = eval_views(meta, cfg, plan.clips, plan.crops, plan.with_video, plan.with_audio)
        rows, windows = [], {}
        for view in views:
            row = self._row(sample, view, rng)
            if plan.decode_video:
                window = (int(view["video_start"]), int(view["video_stride"]))
                try:
                    if window not in windows:  # the crops of an evaluation clip share one decode
                        windows[window] = decode_frames(
                            sample[VIDEO_EXT], window[0], cfg.video_frames, window[1]
                        )
                except DecodeError as err:
                    skips.skip(shard, key, "undecodable video", str(err))
                    return []
                row["video_global"], row["video_local"] = video_views(
                    windows[window], view, cfg.video_size, cfg.video_local_frames, cfg.video_local_size
                )
            elif plan.with_video:
                from xkd.pipeline.dali import video_feed  # the only DALI import, and only on the DALI path

                row["video_feed"] = video_feed(sample[VIDEO_EXT], view)
                row["video_check"] = (shard, key)
            rows.append(row)
        return rows

    def _row(self, sample: Sample, view: View, rng: np.random.Generator | None) -> dict:
        """Labels, audio views and photometric parameters of one view; the random draws happen here, in the same
        order on both decoding paths."""
        plan, cfg = self.plan, self.plan.cfg
        meta = sample["meta"]
        assert isinstance(meta, SampleMeta)
        row: dict[str, object] = {
            "key": str(sample["__key__"]),
            "label": plan.selection.label(meta),
            "start_s": view["start_s"],
            "clip_index": view["clip_index"],
        }
        if plan.with_audio:
            jitter = rng is not None and cfg.augment
            row["audio_global"], row["audio_local"] = audio_views(
                sample["mel"],
                int(view["audio_start"]),
                cfg.audio_mel_frames,
                plan.mel_mean,
                plan.mel_std,
                local_offsets=view["audio_local_offset"] if rng is not None else None,
                local_length=cfg.audio_local_mel_frames,
                rng=rng,
                global_gain=cfg.audio_global_gain if jitter else (1.0, 1.0),
                local_gain=cfg.audio_local_gain if jitter else (1.0, 1.0),
                canvas=cfg.audio_local_canvas,
                freq_scale=cfg.audio_local_freq_scale,
                time_scale=cfg.audio_local_time_scale,
            )
        if plan.with_video:
            local_views = cfg.video_local_views if rng is not None else 0
            row["photo_global"] = draw_photometric(rng, cfg, local=False)
            row["photo_local"] = [draw_photometric(rng, cfg, local=True) for _ in range(local_views)]
        return row

    def _collate(self, rows: list[dict]) -> Batch | dict:
        plan = self.plan
        side: dict[str, object] = {
            "key": [r["key"] for r in rows],
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.int64),
            "start_s": torch.tensor([r["start_s"] for r in rows], dtype=torch.float32),
            "clip_index": torch.tensor([r["clip_index"] for r in rows], dtype=torch.int64),
            "audio_global": torch.stack([r["audio_global"] for r in rows]) if plan.with_audio else None,
            "audio_local": None,
        }
        if plan.with_audio and rows[0]["audio_local"] is not None:
            side["audio_local"] = torch.stack([r["audio_local"] for r in rows], 1)  # (L', B, 1, F, T_l)
        if not plan.with_video:
            return Batch(video_global=None, video_local=None, **side)
        local_views = len(rows[0]["photo_local"])
        photo_global = collate_photometric([r["photo_global"] for r in rows])
        photo_local = [collate_photometric([r["photo_local"][i] for r in rows]) for i in range(local_views)]
        side.update(photo_global=photo_global, photo_local=photo_local)
        if not plan.decode_video:
            return dict(
                side,
                video_feed=[r["video_feed"] for r in rows],
                video_check=[r["video_check"] for r in rows],
            )
        video_global = stack_views([r["video_global"] for r in rows])
        video_local = [stack_views([r["video_local"][i] for r in rows]) for i in range(local_views)]
        if plan.augment_device is None:
            return augmented_batch(
                side, video_global, video_local, torch.device("cpu"), plan.cfg.video_blur_kernel
            )
        return dict(side, video_global=video_global, video_local=video_local)


def _keep(batch: object) -> object:
    # The reader collates in the worker; DataLoader's default conversion would turn DALI's numpy feed into tensors.
    return batch


def _unpack(
    loader: Iterator[tuple[Batch | dict, int, dict[str, int]]], counts: dict[int, dict[str, int]]
) -> Iterator:
    """The reader's batches, recording each worker's latest skip counts."""
    for batch, worker, worker_counts in loader:
        counts[worker] = worker_counts
        yield batch


def _augmented(batches: Iterator[dict], device: torch.device, blur_kernel: int) -> Iterator[Batch]:
    """The reader's uint8 PyAV views, augmented and normalised on `device`."""
    for raw in batches:
        yield augmented_batch(raw, raw.pop("video_global"), raw.pop("video_local"), device, blur_kernel)


class BatchIterator:
    """Iterator of `Batch` with the reader's skip counts summed over workers (`skipped`) and the backend used."""

    def __init__(self, plan: ReadPlan, backend: str, max_batch: int):
        self.backend = backend
        self._counts: dict[int, dict[str, int]] = {}
        to_gpu = plan.decode_video and plan.augment_device is not None and plan.augment_device.type == "cuda"
        loader = DataLoader(
            ReaderDataset(plan),
            batch_size=None,
            num_workers=plan.cfg.num_workers,
            collate_fn=_keep,
            pin_memory=to_gpu,  # the uint8 views then reach the GPU by an asynchronous copy
        )
        # A plain generator, not a bound method: a reference back to self would make a cycle that keeps the worker
        # processes alive until the garbage collector runs (and then costs a 5 s join timeout per worker).
        batches = _unpack(iter(loader), self._counts)
        self._source = batches
        if backend.startswith("dali") and plan.with_video:
            from xkd.pipeline.dali import DaliBatches

            cfg = plan.cfg
            self._batches: Iterator[Batch] = DaliBatches(
                batches,
                device=backend.removeprefix("dali-"),
                max_batch=max_batch,
                frames=cfg.video_frames,
                size=cfg.video_size,
                local_frames=cfg.video_local_frames,
                local_size=cfg.video_local_size,
                local_views=cfg.video_local_views if plan.train else 0,
                threads=cfg.dali_threads,
                augment_device=plan.augment_device,
                blur_kernel=cfg.video_blur_kernel,
            )
        elif plan.decode_video and plan.augment_device is not None:
            self._batches = _augmented(batches, plan.augment_device, plan.cfg.video_blur_kernel)
        else:
            self._batches = batches

    @property
    def skipped(self) -> Counter[str]:
        """Samples skipped so far, by reason, over all workers (each also raised a `SkippedSampleWarning`)."""
        total: Counter[str] = Counter()
        for counts in self._counts.values():
            total.update(counts)
        return total

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        """Stop the reader workers now (also done when the iterator is garbage-collected)."""
        source = getattr(self, "_source", None)  # None if __init__ failed before the reader started
        if source is not None:
            source.close()

    def __del__(self) -> None:
        # The DALI pipeline keeps itself alive in reference cycles; closing the reader here shuts the workers down
        # when the last user reference goes, instead of whenever the cycle collector runs.
        self.close()


def _selection(cfg: DataConfig, split: str, fold: int | None, train: bool, with_video: bool) -> Selection:
    require_audio = train if cfg.require_audio is None else cfg.require_audio
    return Selection(
        split=split, fold=fold, classes=cfg.classes, require_audio=require_audio, require_video=with_video
    )


def _check_classes(cfg: DataConfig) -> None:
    if cfg.classes is None:
        return
    known = dataset_info(cfg.shards)["classes"]
    unknown = [c for c in cfg.classes if c not in known]
    if unknown:
        raise ValueError(
            f"DataConfig.classes names classes that {cfg.shards}/{DATASET_JSON} lacks: {unknown}"
        )


def _has_video(shards: list[str], cfg: DataConfig) -> bool:
    """Whether the data have video: `cfg.with_video`, or the first sample's json when it is None."""
    if cfg.with_video is not None:
        return cfg.with_video
    first = next(read_tar(shards[:1], SkipCounter(cfg.max_consecutive_skips), keep=lambda sample: True), None)
    if first is None:
        raise RuntimeError(f"{shards[0]} holds no readable sample")
    meta = first["meta"]
    assert isinstance(meta, SampleMeta)
    return meta.has_video


def _plan(
    cfg: DataConfig, split: str, fold: int | None, train: bool, backend: str, **kwargs: object
) -> ReadPlan:
    shards, _ = list_shards(cfg.shards, split)
    _check_classes(cfg)
    with_video = _has_video(shards, cfg)
    mean, std = mel_stats(cfg)
    return ReadPlan(
        cfg=cfg,
        shards=shards,
        selection=_selection(cfg, split, fold, train, with_video),
        train=train,
        with_video=with_video,
        with_audio=cfg.with_audio,
        decode_video=with_video and backend == "pyav",
        augment_device=augment_device(cfg, backend) if with_video else None,
        mel_mean=mean,
        mel_std=std,
        **kwargs,
    )


def make_train_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, step: int = 0
) -> BatchIterator:
    """The endless training stream of this rank: `cfg.batch_size` samples per batch with random global and local
    views. Reseeded from (seed, step, rank), so a resumed run continues with fresh, reproducible data instead of
    fast-forwarding the stream."""
    backend = resolve_backend(cfg)
    plan = _plan(
        cfg, cfg.split, cfg.fold, True, backend, rank=rank, world_size=world_size, seed=(seed, step, rank)
    )
    split_shards(
        plan.shards, rank, world_size, 0, max(cfg.num_workers, 1)
    )  # too few shards: fail here, not in a worker
    return BatchIterator(plan, backend, cfg.batch_size)


def make_eval_loader(
    cfg: DataConfig,
    split: str = "test",
    fold: int | None = None,
    clips: int = 3,
    crops: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> BatchIterator:
    """One evaluation pass over `split` (and `fold`) for this rank: every selected sample exactly once over ranks x
    workers, as `clips` evenly spaced windows x `crops` crops flattened into the batch (`clip_index`), centre
    crops after resizing the short side to `video_eval_resize`, no random augmentation, no local views."""
    backend = resolve_backend(cfg)
    plan = _plan(
        cfg,
        split,
        cfg.fold if fold is None else fold,
        False,
        backend,
        rank=rank,
        world_size=world_size,
        seed=(0, 0, rank),
        clips=clips,
        crops=crops,
    )
    return BatchIterator(plan, backend, cfg.batch_size * clips * crops)


def count_samples(
    cfg: DataConfig, split: str | None = None, fold: int | None = None, train: bool = True
) -> int:
    """Samples of `split` (default `cfg.split`) that the loaders would select, counted from the json members
    (headers and json only: no video bytes are read). `train` picks the training or evaluation default of
    `require_audio`."""
    split = cfg.split if split is None else split
    fold = cfg.fold if fold is None else fold
    shards, _ = list_shards(cfg.shards, split)
    _check_classes(cfg)
    selection = _selection(cfg, split, fold, train, _has_video(shards, cfg))
    count = 0

    def tally(sample: Sample) -> bool:
        nonlocal count
        count += selection(sample)
        return False  # nothing more is read

    for _ in read_tar(shards, SkipCounter(cfg.max_consecutive_skips), keep=tally):
        pass
    return count
