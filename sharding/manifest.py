"""What a shard set says about itself: `manifest.parquet` (one row per input file) and `dataset.json`.

`../shared/contracts.md` ("Shards") fixes both: the manifest carries status / reason / key / shard and the same
metadata names as the sample json; `dataset.json` carries `schema_version`, the class list, counts per split and
fold, the parameters, the tool version and the log-mel statistics as count / sum / sum of squares in float64, so
that `--part` runs merge exactly. The pipeline normalises the audio input with those statistics when asked (XKD
normalises log-mel with dataset statistics, paper section "Experiments"; `../shared/xkd-method.md` section 3.3).
This module also owns `merge` (combining the parts of a fanned-out run) and the `stats` and end-of-run summaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xkd.sharding.schema import SCHEMA_VERSION, SampleMeta

MANIFEST = "manifest.parquet"
DATASET_JSON = "dataset.json"
# Reasons that come from a choice of the user (not from broken data) do not count towards --max-failed.
DELIBERATE_PREFIXES = ("skipped:",)


def part_suffix(part: tuple[int, int] | None) -> str:
    return "" if part is None else f"-p{part[0]:03d}of{part[1]:03d}"


def manifest_name(part: tuple[int, int] | None = None) -> str:
    return f"manifest{part_suffix(part)}.parquet"


def dataset_json_name(part: tuple[int, int] | None = None) -> str:
    return f"dataset{part_suffix(part)}.json"


@dataclass
class ManifestRow:
    """One input file. Names shared with the sample json (`SampleMeta`) mean the same facts."""

    source: str
    """Path relative to `--src`."""
    key: str
    """Sample key; for a source cut into `--clip-seconds` windows, the source key the windows carry."""
    dataset: str
    status: str = "failed"
    """`ok` (its samples are in the shards) or `failed`."""
    reason: str = ""
    """Failed: why (`<category>: <details>`). Ok: remarks, e.g. a converted variable frame rate; '' if none."""
    split: str = ""
    folds: dict[str, str] | None = None
    label: int = -1
    label_name: str = ""
    duration_s: float = 0.0
    """Seconds covered by the samples (sum over windows)."""
    fps: float = 0.0
    num_frames: int = 0
    """Frames over all samples of the file."""
    mel_frames: int = 0
    """Log-mel frames over all samples of the file."""
    has_audio: bool = False
    width: int = 0
    height: int = 0
    samples: int = 0
    """Samples written (1, or the number of windows; 0 when failed)."""
    shard: str = ""
    """Shard holding the sample (comma-separated when the windows of one file span several shards)."""
    source_bytes: int = 0
    source_duration_s: float = 0.0
    source_width: int = 0
    source_height: int = 0
    source_fps: float = 0.0
    source_video_codec: str = ""
    source_audio_codec: str = ""
    source_sample_rate: int = 0
    rotation: int = 0
    """Display rotation of the source in degrees (applied to the re-encoded video)."""
    elapsed_s: float = 0.0
    """Processing time of the file (seconds, one worker)."""

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> ManifestRow:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})  # type: ignore[arg-type]


_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _arrow_schema() -> pa.Schema:
    fields = []
    for f in dataclasses.fields(ManifestRow):
        # `folds` is stored as JSON text: readable by any parquet tool without map-type support.
        arrow = pa.string() if f.name == "folds" else _ARROW_TYPES[str(f.type)]
        fields.append(pa.field(f.name, arrow, nullable=f.name == "folds"))
    return pa.schema(fields, metadata={"schema_version": str(SCHEMA_VERSION)})


MANIFEST_SCHEMA = _arrow_schema()


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Write rows (sorted by source) to `path` atomically."""
    rows = sorted(rows, key=lambda r: r.source)
    columns: dict[str, list[object]] = {f.name: [] for f in MANIFEST_SCHEMA}
    for row in rows:
        for name, value in row.to_dict().items():
            if name == "folds":
                value = None if value is None else json.dumps(value, sort_keys=True)
            columns[name].append(value)
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    with _atomic(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: Path) -> list[ManifestRow]:
    rows = []
    for raw in pq.read_table(path).to_pylist():
        raw["folds"] = None if raw.get("folds") is None else json.loads(raw["folds"])
        rows.append(ManifestRow.from_dict(raw))
    return rows


class _atomic:
    """Context manager: a temporary path next to `path`, moved onto it on success (never half-written)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        os.close(fd)
        self.tmp = Path(name)
        # mkstemp makes the file private; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


def write_json(data: dict[str, object], path: Path) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass
class MelStats:
    """Mergeable statistics of stored log-mel values: element count, sum and sum of squares in float64."""

    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    samples: int = 0

    def add(self, count: int, total: float, total_sq: float, samples: int = 1) -> None:
        self.count += count
        self.sum += total
        self.sumsq += total_sq
        self.samples += samples

    def merge(self, other: MelStats) -> None:
        self.add(other.count, other.sum, other.sumsq, other.samples)

    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def std(self) -> float:
        if not self.count:
            return math.nan
        return math.sqrt(max(0.0, self.sumsq / self.count - self.mean() ** 2))

    def to_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq, "samples": self.samples}

    @classmethod
    def from_dict(cls, raw: dict[str, float | int]) -> MelStats:
        return cls(
            count=int(raw["count"]),
            sum=float(raw["sum"]),
            sumsq=float(raw["sumsq"]),
            samples=int(raw["samples"]),
        )


def stats_keys(split: str, folds: dict[str, str] | None, fold_dataset: bool) -> list[str]:
    """The `mel_stats` groups a sample counts in: `all`, its split, and for fold datasets `train` = fold-1 train."""
    keys = ["all"]
    if fold_dataset:
        if folds and folds.get("1") == "train":
            keys.append("train")
    elif split != "all":
        keys.append(split)
    return keys


@dataclass
class Counts:
    """Sample counts of a shard set, as written under `counts` in `dataset.json`."""

    files: int = 0
    ok: int = 0
    failed: int = 0
    samples: int = 0
    with_audio: int = 0
    hours: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)
    folds: dict[str, dict[str, int]] = field(default_factory=dict)
    per_class: dict[str, int] = field(default_factory=dict)
    train: int = 0
    """Samples a pretraining epoch draws from: split `train`, or fold-1 train for fold datasets."""


def count_samples(rows: list[ManifestRow], fold_dataset: bool) -> Counts:
    """Counts of files and samples (a file cut into windows counts each window) from the manifest rows."""
    counts = Counts(files=len(rows))
    for row in rows:
        if row.status != "ok":
            counts.failed += 1
            continue
        counts.ok += 1
        n = row.samples
        counts.samples += n
        counts.with_audio += n if row.has_audio else 0
        counts.hours += row.duration_s / 3600.0
        counts.splits[row.split] = counts.splits.get(row.split, 0) + n
        for fold, role in (row.folds or {}).items():
            roles = counts.folds.setdefault(fold, {})
            roles[role] = roles.get(role, 0) + n
        name = row.label_name or "<unlabelled>"
        counts.per_class[name] = counts.per_class.get(name, 0) + n
        counts.train += (
            n if (row.folds or {}).get("1") == "train" or (not fold_dataset and row.split == "train") else 0
        )
    counts.hours = round(counts.hours, 6)
    counts.splits = dict(sorted(counts.splits.items()))
    counts.folds = {
        k: dict(sorted(v.items())) for k, v in sorted(counts.folds.items(), key=lambda kv: _fold_order(kv[0]))
    }
    counts.per_class = dict(sorted(counts.per_class.items()))
    return counts


def _fold_order(fold: str) -> tuple[int, str]:
    return (int(fold), fold) if fold.isdigit() else (1 << 30, fold)


def failure_fraction(rows: list[ManifestRow]) -> float:
    """Failed files over all files, not counting files left out on purpose (e.g. `--no-audio skip`)."""
    if not rows:
        return 0.0
    failed = sum(r.status != "ok" and not r.reason.startswith(DELIBERATE_PREFIXES) for r in rows)
    return failed / len(rows)


def reason_category(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


def summary_table(rows: list[ManifestRow], counts: Counts, max_failed: float, title: str) -> str:
    """The end-of-run summary: files, samples, splits, failures by category with an example each."""
    fraction = failure_fraction(rows)
    lines = [title, f"  {'files':<24}{counts.files:>8}"]
    lines.append(f"  {'ok':<24}{counts.ok:>8}   samples {counts.samples}, {counts.hours:.3f} h of media")
    lines.append(
        f"  {'failed':<24}{counts.failed:>8}   {100 * fraction:.1f}% counted (limit {100 * max_failed:.1f}%)"
    )
    for split, n in sorted(counts.splits.items()):
        lines.append(f"  {'samples in ' + split:<24}{n:>8}")
    for fold, roles in counts.folds.items():
        text = ", ".join(f"{role} {n}" for role, n in sorted(roles.items()))
        lines.append(f"  {'fold ' + fold:<24}{'':>8}   {text}")
    failures = [r for r in rows if r.status != "ok"]
    if failures:
        lines.append("  failures by reason:")
        by_category = Counter(reason_category(r.reason) for r in failures)
        examples = {}
        for r in failures:
            examples.setdefault(reason_category(r.reason), r)
        for category, n in by_category.most_common():
            example = examples[category]
            lines.append(f"    {n:>6}  {category}  (e.g. {example.source}: {example.reason})")
    notes = Counter(reason_category(r.reason) for r in rows if r.status == "ok" and r.reason)
    if notes:
        lines.append("  converted with remarks: " + ", ".join(f"{c} {n}" for c, n in notes.most_common()))
    return "\n".join(lines)


def aggregate(row: ManifestRow, metas: list[SampleMeta]) -> None:
    """Set a file's row from the samples it produced (all windows, those of earlier runs included)."""
    row.samples = len(metas)
    row.duration_s = round(sum(m.duration_s for m in metas), 6)
    row.num_frames = sum(m.num_frames for m in metas)
    row.mel_frames = sum(m.mel_frames for m in metas)
    row.has_audio = any(m.has_audio for m in metas)
    if metas:
        row.fps, row.width, row.height = metas[0].fps, metas[0].width, metas[0].height


def tool_versions() -> dict[str, str]:
    """Versions of everything that shapes a sample's bytes, recorded in `dataset.json`."""
    import platform
    import subprocess
    from importlib import metadata

    import av
    import imageio_ffmpeg
    import numpy
    import torch
    import torchaudio

    try:
        version = metadata.version("xkd")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        ffmpeg_line = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-version"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        ffmpeg_line = "unknown"
    return {
        "name": "xkd-shard",
        "version": version,
        "python": platform.python_version(),
        "ffmpeg": ffmpeg_line,
        "av": av.__version__,
        "av_ffmpeg": str(getattr(av, "ffmpeg_version_info", "")),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "numpy": numpy.__version__,
    }


@dataclass
class DatasetInfo:
    """The facts about a shard set that do not come from its rows (same for every part of a run)."""

    dataset: str
    layout: str
    source_dir: str
    classes: list[str]
    fold_dataset: bool
    folds: list[str]
    audio_only: bool
    parameters: dict[str, object]
    listing_files: int
    listing_sha1: str


def build_dataset_json(
    info: DatasetInfo,
    rows: list[ManifestRow],
    stats: dict[str, MelStats],
    shards: dict[str, dict[str, object]],
    part: tuple[int, int] | None,
    parts: int | None = None,
    tool: dict[str, str] | None = None,
) -> dict[str, object]:
    """`dataset.json` (or a part's `dataset-pIIIofNNN.json`)."""
    import datetime

    counts = count_samples(rows, info.fold_dataset)
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": info.dataset,
        "layout": info.layout,
        "source_dir": info.source_dir,
        "classes": info.classes,
        "fold_dataset": info.fold_dataset,
        "folds": info.folds,
        "audio_only": info.audio_only,
        "splits": sorted({str(s["split"]) for s in shards.values()}),
        "counts": dataclasses.asdict(counts),
        "mel_stats": {k: v.to_dict() for k, v in sorted(stats.items())},
        "parameters": info.parameters,
        "tool": tool or tool_versions(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "part": list(part) if part else None,
        "parts": parts,
        "listing": {"files": info.listing_files, "sha1": info.listing_sha1, "part_files": len(rows)},
        "shards": [{"name": name, **shards[name]} for name in sorted(shards)],
        "index_dir": "index",
    }


def dataset_info(raw: dict[str, object]) -> DatasetInfo:
    names = {f.name for f in dataclasses.fields(DatasetInfo)}
    listing = raw["listing"]
    assert isinstance(listing, dict)
    values = {k: raw[k] for k in names if k in raw}
    return DatasetInfo(**values, listing_files=int(listing["files"]), listing_sha1=str(listing["sha1"]))  # type: ignore[arg-type]


_PART_JSON = re.compile(r"^dataset-p(\d{3})of(\d{3})\.json$")


def _index_keys(out: Path, name: str) -> list[str] | None:
    """Sample keys of a shard, read from its DALI index (None if the index is missing)."""
    path = out / "index" / (Path(name).stem + ".idx")
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()[1:]
    return [line.split(" ", 4)[3].split(".", 1)[0] for line in lines if line.strip()]


def merge_parts(out: Path) -> list[str]:
    """Combine the part files of a `--part I/N` fan-out in `out` into `manifest.parquet` and `dataset.json`.

    Checks that all N parts finished, agree on dataset, classes, parameters and the input listing, that no file
    or sample key appears twice, that their rows cover every listed file, and that each shard holds the samples
    its part says. Returns the problems found; writes the merged files only when there is none.
    """
    found: dict[int, tuple[int, Path]] = {}
    fanouts = set()
    for path in sorted(out.glob("dataset-p*of*.json")):
        m = _PART_JSON.match(path.name)
        if m:
            found[int(m[1])] = (int(m[2]), path)
            fanouts.add(int(m[2]))
    if not found:
        return [
            f"{out}: no part files (dataset-pIIIofNNN.json); run `xkd-shard --src DIR --out {out} --part I/N` first"
        ]
    if len(fanouts) > 1:
        return [
            f"{out}: parts of different fan-outs ({', '.join(f'of {n}' for n in sorted(fanouts))}); keep one"
        ]
    n = fanouts.pop()
    problems = []
    missing = sorted(set(range(1, n + 1)) - set(found))
    if missing:
        problems.append(
            f"part(s) {', '.join(f'{i}/{n}' for i in missing)} missing or unfinished (no dataset-pIIIof{n:03d}.json): "
            "run them (a rerun resumes) and merge again"
        )
    parts = {i: json.loads(path.read_text()) for i, (_, path) in sorted(found.items())}
    first_i, first = next(iter(parts.items()))
    for i, raw in parts.items():
        for name in ("schema_version", "dataset", "layout", "classes", "parameters", "listing"):
            a, b = raw.get(name), first.get(name)
            if name == "listing":
                a = {k: v for k, v in (a or {}).items() if k != "part_files"}
                b = {k: v for k, v in (b or {}).items() if k != "part_files"}
            if a != b:
                problems.append(
                    f"part {i}/{n} differs from part {first_i}/{n} in {name!r}: rerun it with the same options"
                )
    rows: list[ManifestRow] = []
    owner: dict[str, int] = {}
    for i, raw in parts.items():
        path = out / manifest_name((i, n))
        if not path.is_file():
            problems.append(f"part {i}/{n}: {path.name} is missing")
            continue
        part_rows = read_manifest(path)
        if len(part_rows) != raw["listing"]["part_files"]:
            problems.append(
                f"part {i}/{n}: {path.name} has {len(part_rows)} rows, its json says {raw['listing']['part_files']}"
            )
        for row in part_rows:
            if row.source in owner:
                problems.append(f"overlap: {row.source} is in part {owner[row.source]}/{n} and part {i}/{n}")
            owner[row.source] = i
        rows.extend(part_rows)
    listed = int(first["listing"]["files"])
    if not missing and len(owner) != listed:
        problems.append(f"the parts have rows for {len(owner)} files but the source tree lists {listed}")
    shards: dict[str, dict[str, object]] = {}
    key_shard: dict[str, str] = {}
    for i, raw in parts.items():
        for entry in raw["shards"]:
            name = entry["name"]
            keys = _index_keys(out, name)
            if not (out / name).is_file() or keys is None:
                problems.append(f"part {i}/{n}: shard {name} or its index is missing from {out}")
                continue
            if len(keys) != entry["samples"]:
                problems.append(
                    f"shard {name}: index lists {len(keys)} samples, part {i}/{n} says {entry['samples']}"
                )
            for key in keys:
                if key in key_shard:
                    problems.append(f"duplicate sample {key} in {key_shard[key]} and {name}")
                key_shard[key] = name
            shards[name] = {k: v for k, v in entry.items() if k != "name"}
    written = sum(r.samples for r in rows if r.status == "ok")
    if not problems and written != len(key_shard):
        problems.append(f"the manifests count {written} samples but the shards hold {len(key_shard)}")
    if problems:
        return problems
    stats: dict[str, MelStats] = {}
    for raw in parts.values():
        for group, value in raw["mel_stats"].items():
            stats.setdefault(group, MelStats()).merge(MelStats.from_dict(value))
    info = dataset_info(first)
    write_manifest(rows, out / MANIFEST)
    write_json(
        build_dataset_json(info, rows, stats, shards, None, parts=n, tool=first["tool"]), out / DATASET_JSON
    )
    return []


def describe(out: Path) -> str:
    """`xkd-shard stats`: what a shard set holds, from its `dataset.json` and manifest."""
    path = out / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run xkd-shard (and `xkd-shard merge` after --part runs) first"
        )
    raw = json.loads(path.read_text())
    rows = read_manifest(out / MANIFEST)
    counts = count_samples(rows, raw["fold_dataset"])
    size = sum(int(s["bytes"]) for s in raw["shards"])
    lines = [
        f"{out}: dataset {raw['dataset']!r} ({raw['layout']} layout), schema {raw['schema_version']}, "
        f"made by {raw['tool']['name']} {raw['tool']['version']} on {raw['created_utc']}",
        f"  classes {len(raw['classes'])}; shards {len(raw['shards'])}, {size / 1e6:.1f} MB"
        + (f", merged from {raw['parts']} parts" if raw.get("parts") else ""),
        "  parameters: "
        + ", ".join(f"{k}={v}" for k, v in raw["parameters"].items() if k != "mel" and v is not None),
    ]
    lines.append(summary_table(rows, counts, 1.0, "  files and samples:").replace("\n", "\n  "))
    if counts.per_class:
        per = sorted(counts.per_class.values())
        lines.append(f"  samples per class: min {per[0]}, median {per[len(per) // 2]}, max {per[-1]}")
    if counts.samples:
        lines.append(
            f"  mean sample {3600 * counts.hours / counts.samples:.2f} s, {size / counts.samples / 1e3:.1f} kB"
        )
    for group, value in raw["mel_stats"].items():
        st = MelStats.from_dict(value)
        lines.append(f"  log-mel {group}: mean {st.mean():.4f}, std {st.std():.4f} over {st.samples} samples")
    return "\n".join(lines)
