"""The shard schema: sample keys, member extensions, shard names and the per-sample JSON metadata.

This module is the single source of truth for everything a shard holds (`../shared/contracts.md`, "Shards").
`sharding/` writes it, `pipeline/` and `eval.py` read it; nobody else spells a key or an extension.
Bump `SCHEMA_VERSION` on any change to what a shard holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field

SCHEMA_VERSION = 1

# Member extensions. WebDataset and DALI end a sample key at the first dot of a member name, so keys contain no
# dots and the extensions carry the dots.
VIDEO_EXT = "video.mp4"
MEL_EXT = "mel.npy"
JSON_EXT = "json"

SPLITS = ("train", "val", "test")
# Datasets whose split depends on the fold (UCF101, HMDB51, ESC-50) write one shard set under this name and
# record the per-fold membership in each sample's `folds` field.
FOLD_SPLIT = "all"

_DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)(?:-p(?P<part>\d{3})of(?P<parts>\d{3}))?-(?P<index>\d{6})\.tar$")


def check_dataset_name(dataset: str) -> str:
    """Return `dataset` if it is usable as a key prefix (lower-case ASCII, digits, `_`, `-`), else raise."""
    if not _DATASET_NAME.match(dataset):
        raise ValueError(
            f"dataset name {dataset!r} is not usable in sample keys: use lower-case ASCII letters, digits, "
            "'_' and '-' (no dots), e.g. 'ucf101'"
        )
    return dataset


def make_key(dataset: str, source: str) -> str:
    """The sample key of a source file: `<dataset>_<first 16 hex of sha1(source)>`.

    Args:
        dataset: the dataset name (see `check_dataset_name`).
        source: the source path relative to `--src`, with `/` separators; for a window of a long source,
            `source` followed by `#<window index>`.
    """
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]
    return f"{check_dataset_name(dataset)}_{digest}"


def shard_name(split: str, index: int, part: tuple[int, int] | None = None) -> str:
    """`<split>-%06d.tar`, or `<split>-pIIIofNNN-%06d.tar` for part I of N (1-based) of a fanned-out run."""
    if part is None:
        return f"{split}-{index:06d}.tar"
    i, n = part
    return f"{split}-p{i:03d}of{n:03d}-{index:06d}.tar"


def parse_shard_name(name: str) -> dict[str, int | str | None] | None:
    """Inverse of `shard_name` on a base name: {'split', 'part', 'parts', 'index'} or None if it is not one."""
    m = _SHARD_NAME.match(name)
    if m is None:
        return None
    part = m.group("part")
    return {
        "split": m.group("split"),
        "part": int(part) if part else None,
        "parts": int(m.group("parts")) if part else None,
        "index": int(m.group("index")),
    }


@dataclass
class SampleMeta:
    """The `<key>.json` member of a sample. The manifest uses the same names for the same facts."""

    key: str
    """Sample key, see `make_key`."""
    dataset: str
    """Dataset name, the key prefix."""
    source: str
    """Source path relative to `--src`, `/`-separated."""
    split: str
    """`train`, `val`, `test`, or `all` for fold datasets."""
    label: int
    """0-based id into `dataset.json`'s `classes`, -1 if unlabelled."""
    label_name: str
    """Class name, '' if unlabelled."""
    duration_s: float
    """Duration of the sample (video duration, or audio duration for audio-only samples)."""
    fps: float
    """Frame rate of the re-encoded video (constant); 0 for audio-only samples."""
    num_frames: int
    """Frames in the re-encoded video; 0 for audio-only samples."""
    mel_frames: int
    """Time frames of the log-mel (its second dimension)."""
    has_audio: bool
    """False when the source had no audio stream and the mel is silence."""
    folds: dict[str, str] | None = None
    """Fold datasets: fold id ("1".."5") -> `train`/`test`; None otherwise."""
    source_key: str | None = None
    """Key of the whole source when `--clip-seconds` cut it into windows; None otherwise."""
    width: int = 0
    """Width of the re-encoded video in pixels; 0 for audio-only samples."""
    height: int = 0
    """Height of the re-encoded video in pixels; 0 for audio-only samples."""
    schema_version: int = SCHEMA_VERSION
    """`SCHEMA_VERSION` at writing time."""
    extra: dict[str, object] = field(default_factory=dict)
    """Dataset-specific metadata (e.g. Kinetics `youtube_id`, ESC-50 `esc10`), never used for selection."""

    @property
    def has_video(self) -> bool:
        return self.num_frames > 0

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str) -> SampleMeta:
        """Parse a `<key>.json` member; raise ValueError naming the problem on a malformed or foreign one."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError("sample metadata is not a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {version} but this xkd reads {SCHEMA_VERSION}: re-shard with this version's xkd-shard"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in raw and not _has_default(cls, n))
        if missing:
            raise ValueError(f"sample metadata lacks {missing}")
        return cls(**{k: v for k, v in raw.items() if k in names})


def _has_default(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
