"""The one shard reader shared by the DALI and PyAV paths, as webdataset-style stages (plain generator functions).

Implements the reading rules of `../shared/contracts.md` ("Reading shards"): listing the shards of a split, the
rank/worker split (training: by shard, then resampled within the subset; evaluation: by a stable hash of the key so
every sample is read exactly once), sample selection (split, fold, class subset, has_audio), tar iteration, the
shuffle buffer, and skipping structurally bad samples with a counted warning that names shard and key.
Shard content is never unpickled: metadata is JSON and the mel is read with `numpy.load(allow_pickle=False)`.
"""

from __future__ import annotations

import io
import re
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xkd.sharding.schema import FOLD_SPLIT, JSON_EXT, MEL_EXT, VIDEO_EXT, SampleMeta, parse_shard_name

Sample = dict[str, object]
"""A sample flowing through the stages: `__key__`, `__shard__`, `meta` (SampleMeta) and member bytes by extension
(`video.mp4`, `mel.npy`); later stages add `mel` (ndarray), `label` and view parameters."""

# webdataset's rule: the key is the member path up to the first dot of its base name.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class SkippedSampleWarning(UserWarning):
    """A sample or shard was skipped because it is structurally broken; the message names shard and key."""


class SkipCounter:
    """Counts skipped samples by reason, warns for each, and raises once the data look broken rather than noisy.

    `max_consecutive` bounds both faulty samples in a row and (for resampled streams) shards in a row that yield
    nothing usable, so a fully broken dataset or an empty selection fails with a message instead of looping forever.
    """

    def __init__(self, max_consecutive: int = 1000):
        self.max_consecutive = max_consecutive
        self.counts: Counter[str] = Counter()
        self._in_a_row = 0

    def skip(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        """Count a skipped sample under `reason` (a short category) and warn with the `detail`."""
        self.counts[reason] += 1
        self._in_a_row += 1
        what = f"{reason}: {detail}" if detail else reason
        warnings.warn(
            f"skipping sample {key!r} in {shard}: {what} (skipped so far: {sum(self.counts.values())})",
            SkippedSampleWarning,
            stacklevel=2,
        )
        if self._in_a_row >= self.max_consecutive:
            raise RuntimeError(
                f"{self._in_a_row} faulty samples in a row (last: {key!r} in {shard}: {what}); skip counts "
                f"{dict(self.counts)}. The shards look broken: check them with `xkd-shard verify` and re-shard."
            )

    def ok(self) -> None:
        self._in_a_row = 0


def list_shards(shards_dir: str | Path, split: str) -> tuple[list[str], bool]:
    """The sorted shard paths of `split` in `shards_dir`, and whether they are fold shards (`all-*.tar`).

    Fold datasets (UCF101, HMDB51, ESC-50) keep every split in `all-*.tar` and record the per-fold split in each
    sample's json, so their `train`/`test` split is a selection over all shards.
    """
    root = Path(shards_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"shard directory {root} does not exist: create it with `xkd-shard --src ... --out {root}`"
        )
    by_split: dict[str, list[str]] = {}
    for path in sorted(root.glob("*.tar")):
        parsed = parse_shard_name(path.name)
        if parsed is not None:
            by_split.setdefault(str(parsed["split"]), []).append(str(path))
    if split in by_split:
        return by_split[split], False
    if FOLD_SPLIT in by_split:
        return by_split[FOLD_SPLIT], True
    raise FileNotFoundError(
        f"no shards of split {split!r} in {root} (found splits: {sorted(by_split) or 'none'}); "
        "shard names are <split>-NNNNNN.tar as written by xkd-shard"
    )


def split_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Training split: shards by rank, then by worker. Fails if some rank/worker would get no shard."""
    if len(shards) < world_size * num_workers:
        raise ValueError(
            f"{len(shards)} shards for {world_size} ranks x {num_workers} workers = {world_size * num_workers} "
            "readers: every reader needs at least one shard. Use fewer workers (DataConfig.num_workers) or "
            "re-shard with smaller shards (xkd-shard --max-samples-per-shard)."
        )
    return shards[rank::world_size][worker::num_workers]


def resample(shards: list[str], rng: np.random.Generator) -> Iterator[str]:
    """An endless stream of shards drawn with replacement (webdataset's `ResampledShards`)."""
    while True:
        yield shards[int(rng.integers(len(shards)))]


def sample_part(key: str, parts: int) -> int:
    """The reader (rank x worker) that owns `key` in evaluation: a hash stable across processes and runs
    (Python's `hash` of a str is salted per process, so it cannot be used)."""
    return zlib.crc32(key.encode("utf-8")) % parts


def split_by_key(samples: Iterable[Sample], part: int, parts: int) -> Iterator[Sample]:
    """Evaluation split: keep the samples whose key hashes to `part` of `parts` readers."""
    for sample in samples:
        if sample_part(str(sample["__key__"]), parts) == part:
            yield sample


@dataclass
class Selection:
    """Which samples a loader reads, decided from the json alone (before the video bytes are read)."""

    split: str
    """Wanted split (`train`, `val`, `test`)."""
    fold: int | None = None
    """For fold shards: the fold whose membership decides the split."""
    classes: list[str] | None = None
    """Class-name subset; labels become positions in this list."""
    require_audio: bool = False
    """Drop samples without a real soundtrack."""
    require_video: bool = False
    """Drop samples without a video member."""
    part: int = 0
    """Evaluation: this reader's index among `parts` (see `sample_part`)."""
    parts: int = 1
    """Evaluation: number of readers that split the samples by key; 1 keeps all."""

    def __call__(self, sample: Sample) -> bool:
        meta = sample["meta"]
        assert isinstance(meta, SampleMeta)
        if self.parts > 1 and sample_part(meta.key, self.parts) != self.part:
            return False
        if meta.split == FOLD_SPLIT:
            folds = meta.folds or {}
            if folds.get(str(self.fold or 1)) != self.split:
                return False
        elif meta.split != self.split:
            return False
        if self.classes is not None and meta.label_name not in self.classes:
            return False
        if self.require_audio and not meta.has_audio:
            return False
        return not (self.require_video and not meta.has_video)

    def label(self, meta: SampleMeta) -> int:
        """The label a batch carries: the dataset id, or the position in `classes` when a subset is selected."""
        if self.classes is None:
            return meta.label
        return self.classes.index(meta.label_name)


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive regular-file members grouped by key, headers only (data stay unread until asked for)."""
    key, group = None, {}
    for info in tar:
        match = _MEMBER_NAME.match(info.name) if info.isfile() else None
        if match is None:
            continue
        if match.group(1) != key and group:
            yield key, group
            group = {}
        key = match.group(1)
        group[match.group(2)] = info
    if group:
        yield key, group


def read_tar(
    shards: Iterable[str],
    skips: SkipCounter,
    keep: Callable[[Sample], bool] | None = None,
    resampled: bool = False,
) -> Iterator[Sample]:
    """Samples of each shard in order: the json is parsed first, `keep` is asked, and only kept samples have their
    other members read (random access, so a class subset or another rank's samples cost no video I/O).

    A missing or malformed json, a foreign schema version, or an unreadable shard is skipped with a counted warning.
    On a `resampled` (endless) stream it raises when `skips.max_consecutive` shards in a row yield nothing, which
    means the selection is empty or the shards are broken.
    """
    empty_in_a_row = 0
    for shard in shards:
        found = False
        try:
            with tarfile.open(shard, "r:") as tar:
                for key, members in _group_members(tar):
                    sample = _read_sample(tar, shard, key, members, skips, keep)
                    if sample is not None:
                        found = True
                        yield sample
        except (tarfile.TarError, OSError) as err:
            skips.skip(shard, "*", "unreadable shard", f"{err}; the samples after the fault are lost")
        empty_in_a_row = 0 if found else empty_in_a_row + 1
        if resampled and empty_in_a_row >= skips.max_consecutive:
            raise RuntimeError(
                f"{empty_in_a_row} shards in a row (last {shard}) held no sample matching the selection; "
                f"skip counts {dict(skips.counts)}. Check DataConfig split/fold/classes/require_audio."
            )


def _read_sample(
    tar: tarfile.TarFile,
    shard: str,
    key: str,
    members: dict[str, tarfile.TarInfo],
    skips: SkipCounter,
    keep: Callable[[Sample], bool] | None,
) -> Sample | None:
    if JSON_EXT not in members:
        skips.skip(shard, key, "missing member", f"{key}.{JSON_EXT}")
        return None
    try:
        meta = SampleMeta.from_json(_member_bytes(tar, members[JSON_EXT]))
    except (ValueError, TypeError) as err:
        skips.skip(shard, key, "bad json", f"{key}.{JSON_EXT}: {err}")
        return None
    sample: Sample = {"__key__": key, "__shard__": shard, "meta": meta}
    if keep is not None and not keep(sample):
        return None
    for ext, info in members.items():
        if ext != JSON_EXT:
            sample[ext] = _member_bytes(tar, info)
    return sample


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # regular files only, see _group_members
    return handle.read()


def select(samples: Iterable[Sample], keep: Callable[[Sample], bool]) -> Iterator[Sample]:
    """Keep the samples `keep` accepts (the same predicate `read_tar` applies before reading members)."""
    return (sample for sample in samples if keep(sample))


def shuffle(
    samples: Iterable[Sample], bufsize: int, rng: np.random.Generator, initial: int = 100
) -> Iterator[Sample]:
    """webdataset's buffer shuffle: once `initial` samples are buffered, each new sample is followed by a random
    pick from the buffer; the buffer grows two-for-one up to `bufsize`, so the first batch does not wait for a
    full buffer."""
    it = iter(samples)
    initial = min(initial, bufsize)
    buffer: list[Sample] = []
    for sample in it:
        buffer.append(sample)
        if len(buffer) < bufsize:
            extra = next(it, None)
            if extra is not None:
                buffer.append(extra)
        if len(buffer) >= initial:
            yield _pick(buffer, rng)
    while buffer:
        yield _pick(buffer, rng)


def _pick(buffer: list[Sample], rng: np.random.Generator) -> Sample:
    index = int(rng.integers(len(buffer)))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def decode_members(
    samples: Iterable[Sample], skips: SkipCounter, mel_bins: int, need_video: bool, need_audio: bool
) -> Iterator[Sample]:
    """Check members and load the mel: skip (counted) a missing member, a bad npy, or a mel whose shape disagrees
    with its json. Adds `mel` (float16/float32 ndarray (F, T)) when audio is needed."""
    for sample in samples:
        key, shard = str(sample["__key__"]), str(sample["__shard__"])
        meta = sample["meta"]
        assert isinstance(meta, SampleMeta)
        if need_video and VIDEO_EXT not in sample:
            skips.skip(shard, key, "missing member", f"{key}.{VIDEO_EXT}")
            continue
        if need_audio:
            if MEL_EXT not in sample:
                skips.skip(shard, key, "missing member", f"{key}.{MEL_EXT}")
                continue
            try:
                mel = np.load(io.BytesIO(sample[MEL_EXT]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                skips.skip(shard, key, "bad mel", f"{key}.{MEL_EXT}: {err}")
                continue
            problem = _mel_problem(mel, mel_bins, meta.mel_frames)
            if problem:
                skips.skip(shard, key, "bad mel", f"{key}.{MEL_EXT}: {problem}")
                continue
            sample["mel"] = mel
        skips.ok()
        yield sample


def _mel_problem(mel: np.ndarray, mel_bins: int, mel_frames: int) -> str:
    if mel.dtype not in (np.float16, np.float32):
        return f"dtype {mel.dtype}, expected float16"
    if mel.ndim != 2 or mel.shape[0] != mel_bins:
        return f"shape {mel.shape}, expected ({mel_bins}, T)"
    if mel.shape[1] != mel_frames:
        return f"{mel.shape[1]} frames but its json says mel_frames={mel_frames}"
    if not np.isfinite(mel).all():
        return "non-finite values"
    return ""


def batched(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    """Lists of `size` items; the last one may be shorter."""
    batch: list[Sample] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
