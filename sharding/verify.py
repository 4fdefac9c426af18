"""`xkd-shard verify`: decode every sample of a shard set and report the bad ones.

A decoder error inside DALI stops a training run (`../shared/contracts.md`, "Reading shards"), so the pipeline's
error message points here. Every sample is checked the way the XKD input pipeline will consume it (paper section
"Experiments": video clips and log-mel spectrograms): the members are present, the json parses under this
schema version, the log-mel is float16 (80, mel_frames) and finite, the video decodes with the frame count, size,
frame rate and keyframe spacing its json announces, the DALI index points at the right bytes, and the shards
agree with the manifest (no sample missing, none extra, none twice).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xkd.sharding.encode import KEYFRAME_INTERVAL, SourceError, check_video
from xkd.sharding.manifest import DATASET_JSON, MANIFEST, read_manifest
from xkd.sharding.mel import N_MELS
from xkd.sharding.runner import make_pool
from xkd.sharding.schema import JSON_EXT, MEL_EXT, VIDEO_EXT, SampleMeta, parse_shard_name
from xkd.sharding.writer import index_path


@dataclass
class ShardReport:
    name: str
    samples: dict[str, str]
    """key -> source (from its json) of every sample found."""
    problems: list[tuple[str, str]]
    """(key or '-', problem)."""


def check_sample(key: str, members: dict[str, bytes], audio_only: bool) -> list[str]:
    """Problems of one sample (empty if it is good)."""
    problems = []
    wanted = {JSON_EXT, MEL_EXT} | (set() if audio_only else {VIDEO_EXT})
    missing = sorted(wanted - set(members))
    if missing:
        problems.append(f"missing member(s) {', '.join(missing)}")
    extra = sorted(set(members) - wanted)
    if extra:
        problems.append(f"unexpected member(s) {', '.join(extra)}")
    if JSON_EXT not in members:
        return problems
    try:
        meta = SampleMeta.from_json(members[JSON_EXT])
    except (ValueError, TypeError) as err:
        return [*problems, f"bad json: {err}"]
    if meta.key != key:
        problems.append(f"json key {meta.key!r} differs from the member name")
    if MEL_EXT in members:
        try:
            mel = np.load(io.BytesIO(members[MEL_EXT]), allow_pickle=False)
        except ValueError as err:
            problems.append(f"bad mel npy: {err}")
        else:
            if mel.dtype != np.float16 or mel.shape != (N_MELS, meta.mel_frames):
                problems.append(
                    f"mel is {mel.dtype} {mel.shape}, json says float16 ({N_MELS}, {meta.mel_frames})"
                )
            elif not np.isfinite(mel).all():
                problems.append("mel has non-finite values")
    if VIDEO_EXT in members:
        try:
            check = check_video(io.BytesIO(members[VIDEO_EXT]))
        except SourceError as err:
            problems.append(f"video: {err}")
        else:
            if check.frames != meta.num_frames:
                problems.append(f"video decodes {check.frames} frames, json says {meta.num_frames}")
            if (check.width, check.height) != (meta.width, meta.height):
                problems.append(
                    f"video is {check.width}x{check.height}, json says {meta.width}x{meta.height}"
                )
            if abs(check.fps - meta.fps) > 1e-3:
                problems.append(f"video runs at {check.fps:g} fps, json says {meta.fps:g}")
            if check.max_gop > KEYFRAME_INTERVAL:
                problems.append(
                    f"keyframes {check.max_gop} frames apart (at most {KEYFRAME_INTERVAL} expected)"
                )
    return problems


def verify_shard(path: Path, audio_only: bool) -> ShardReport:
    """Check every sample of one shard and its DALI index."""
    report = ShardReport(name=path.name, samples={}, problems=[])
    offsets: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                sample_key, _, ext = name.partition(".")
                offsets[name] = (member.offset_data, member.size)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if sample_key != key:
                    if key is not None:
                        _finish(report, key, members, audio_only)
                    key, members = sample_key, {}
                if ext in members:
                    report.problems.append((sample_key, f"member {name} appears twice"))
                members[ext] = data
            if key is not None:
                _finish(report, key, members, audio_only)
    except (tarfile.TarError, OSError) as err:
        report.problems.append(("-", f"unreadable tar: {err}"))
        return report
    report.problems.extend(_check_index(path, offsets))
    return report


def _finish(report: ShardReport, key: str, members: dict[str, bytes], audio_only: bool) -> None:
    if key in report.samples:
        report.problems.append((key, "sample appears twice in the shard (members not consecutive)"))
    for problem in check_sample(key, members, audio_only):
        report.problems.append((key, problem))
    try:
        report.samples[key] = json.loads(members[JSON_EXT])["source"]
    except (KeyError, ValueError, TypeError):
        report.samples[key] = ""


def _check_index(path: Path, offsets: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    index = index_path(path.parent, path.name)
    if not index.is_file():
        return [("-", f"DALI index {index} is missing")]
    lines = index.read_text().splitlines()
    problems = []
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or int(header[1]) != len(lines) - 1:
        problems.append(("-", f"DALI index {index.name}: bad header {lines[:1]}"))
    listed = 0
    for line in lines[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            listed += 1
            if offsets.get(name) != (int(offset), int(size)):
                problems.append(
                    (name.split(".", 1)[0], f"DALI index entry for {name} ({ext}) points at the wrong bytes")
                )
    if listed != len(offsets):
        problems.append(("-", f"DALI index {index.name} lists {listed} members, the tar has {len(offsets)}"))
    return problems


def verify(out: Path, workers: int = 1) -> tuple[int, list[tuple[str, str, str]]]:
    """Verify every shard of `out`; return (samples checked, [(shard, key, problem)])."""
    dataset_json = out / DATASET_JSON
    shards = sorted(p for p in out.glob("*.tar") if parse_shard_name(p.name))
    audio_only = False
    problems: list[tuple[str, str, str]] = []
    listed: set[str] | None = None
    if dataset_json.is_file():
        raw = json.loads(dataset_json.read_text())
        audio_only = bool(raw["audio_only"])
        listed = {s["name"] for s in raw["shards"]}
        for name in sorted(listed - {p.name for p in shards}):
            problems.append((name, "-", "shard listed in dataset.json is missing"))
        for path in shards:
            if path.name not in listed:
                problems.append(
                    (path.name, "-", "shard is not listed in dataset.json (left over from another run?)")
                )
    args = [(path, audio_only) for path in shards]
    if workers > 1 and len(args) > 1:
        with make_pool(workers) as pool:
            reports = list(pool.map(verify_shard, *zip(*args)))
    else:
        reports = [verify_shard(*a) for a in args]
    seen: dict[str, str] = {}
    by_source: dict[str, int] = {}
    for report in reports:
        problems.extend((report.name, key, problem) for key, problem in report.problems)
        for key, source in report.samples.items():
            if key in seen:
                problems.append((report.name, key, f"duplicate sample: also in {seen[key]}"))
            seen[key] = report.name
            by_source[source] = by_source.get(source, 0) + 1
    manifest = out / MANIFEST
    if manifest.is_file() and listed is not None:
        for row in read_manifest(manifest):
            found = by_source.pop(row.source, 0)
            expected = row.samples if row.status == "ok" else 0
            if found != expected:
                problems.append(
                    ("-", row.key, f"manifest row {row.source!r} has {expected} samples, shards {found}")
                )
        for source, found in sorted(by_source.items()):
            problems.append(
                ("-", "-", f"{found} sample(s) of {source!r} are in the shards but not in the manifest")
            )
    return len(seen), problems
