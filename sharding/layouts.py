"""Dataset layouts: find the input files of a source tree and their split, folds and label.

Reads the official on-disk formats of the datasets XKD is trained and evaluated on (paper section "Experiments":
Kinetics-400 / Kinetics-Sound pretraining, UCF101 and HMDB51 video, ESC-50 audio downstream) plus a generic
`<split>/<class>/file` or `<class>/file` tree (`../shared/data-formats.md` has the formats). The result is a
`Listing`: one `Item` per input file, and one per file a split file lists but that is absent. Problems found while
listing (absent files, files no split file mentions, unknown class folders, conflicting duplicate listings, names
that are not valid UTF-8) are items with an `error`, so they end as manifest rows instead of vanishing.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from xkd.sharding.schema import FOLD_SPLIT, make_key

LAYOUTS = ("kinetics", "ucf101", "hmdb51", "esc50", "generic")
# Extensions of input files (case-insensitive); anything else in the tree (.txt, .csv, .json) is not an input.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg", ".3gp", ".ts", ".mts"}
    | {".m2ts", ".ogv", ".vob", ".asf", ".divx"}
)
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff"}
)
# Folder names that mean a split in generic trees (and in Kinetics clip folders).
_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val"}
_SPLIT_DIRS |= {"validation": "val", "test": "test", "testing": "test"}


@dataclass
class Item:
    """One input file (or one listed-but-absent file) and what the layout says about it."""

    source: str
    """Path relative to `--src` with `/` separators (for an absent file: where the split file says it is)."""
    path: Path | None
    """Absolute path on disk; None for a listed file that is absent."""
    split: str
    """`train`, `val`, `test`, or `all` for fold datasets."""
    label: int = -1
    """0-based class id, -1 if unlabelled."""
    label_name: str = ""
    """Class name, '' if unlabelled."""
    folds: dict[str, str] | None = None
    """Fold datasets: fold id -> `train` / `test` (folds where the file is unused are absent)."""
    extra: dict[str, object] = field(default_factory=dict)
    """Dataset-specific metadata copied into the sample json (e.g. Kinetics `youtube_id`)."""
    error: str | None = None
    """Why this file cannot become a sample although it was listed (the manifest reason); None if it can."""
    notes: list[str] = field(default_factory=list)
    """Remarks that do not stop the file (e.g. a duplicate listing with the same label)."""

    def key(self, dataset: str) -> str:
        return make_key(dataset, self.source)


@dataclass
class Listing:
    """Everything `list_sources` found under `--src`."""

    layout: str
    dataset: str
    classes: list[str]
    items: list[Item]
    fold_dataset: bool
    """UCF101, HMDB51, ESC-50: one `all` split with per-sample fold membership."""
    audio_only: bool
    """ESC-50 (or `--audio-only`): samples are log-mel + json, no video."""
    folds: list[str] = field(default_factory=list)
    """Fold ids present, e.g. ["1", "2", "3"]."""
    described: list[str] = field(default_factory=list)
    """Which annotation files were read (for the summary)."""

    def digest(self) -> str:
        """sha1 over the sorted sources: equal for every `--part` run over the same tree."""
        h = hashlib.sha1()
        for source in sorted(item.source for item in self.items):
            h.update(source.encode("utf-8") + b"\n")
        return h.hexdigest()


class LayoutError(ValueError):
    """The tree does not match the layout (message says what is missing and what to do)."""


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _valid_name(source: str) -> str | None:
    """The error for a file name that is not valid UTF-8 (it cannot go into json, parquet or a key)."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        return "bad file name: not valid UTF-8; rename the file"
    return None


def _printable(source: str) -> str:
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk_files(root: Path, extensions: frozenset[str], skip: Path | None = None) -> list[Path]:
    """Files under `root` with one of `extensions` (case-insensitive), sorted; hidden entries are skipped.

    Linked folders are followed (datasets often link split or class folders to other disks), each real folder
    once, so a link loop cannot recurse forever.
    """
    found: list[Path] = []
    skip = skip.resolve() if skip is not None else None
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(
            d for d in dirnames if _visible(d) and (skip is None or (here / d).resolve() != skip)
        )
        for name in filenames:
            if _visible(name) and os.path.splitext(name)[1].lower() in extensions:
                found.append(here / name)
    return sorted(found)


def _file_item(root: Path, path: Path, **kwargs: object) -> Item:
    source = _rel(root, path)
    error = _valid_name(source)
    if error is not None:
        return Item(source=_printable(source), path=path, error=error, **kwargs)  # type: ignore[arg-type]
    return Item(source=source, path=path, **kwargs)  # type: ignore[arg-type]


def detect_layout(src: Path) -> str:
    """Guess the layout of `src` from its annotation files; `generic` when none is found."""
    if (src / "meta" / "esc50.csv").is_file():
        return "esc50"
    if _find_dir(src, "ucfTrainTestlist") is not None:
        return "ucf101"
    if _hmdb_split_dir(src) is not None:
        return "hmdb51"
    if _kinetics_csvs(src):
        return "kinetics"
    return "generic"


def _find_dir(src: Path, name: str) -> Path | None:
    for candidate in (src / name, *(d / name for d in _subdirs(src))):
        if candidate.is_dir():
            return candidate
    return None


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p.name))
    except OSError:
        return []


def list_sources(
    src: Path,
    layout: str = "auto",
    dataset: str | None = None,
    audio_only: bool = False,
    skip: Path | None = None,
) -> Listing:
    """List the input files of `src`.

    Args:
        src: the dataset root.
        layout: one of `LAYOUTS`, or `auto` to detect it.
        dataset: the key prefix; default the layout name (generic: the folder name, made key-safe).
        audio_only: make audio-only samples (implied by ESC-50); generic trees then also take audio files.
        skip: a folder under `src` to ignore (the output folder when it lies inside the source tree).
    """
    src = src.resolve()
    if not src.is_dir():
        raise LayoutError(f"--src {src} is not a directory")
    if layout == "auto":
        layout = detect_layout(src)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)} or auto")
    name = dataset or (layout if layout != "generic" else _dataset_name(src.name))
    listing = {
        "kinetics": _list_kinetics,
        "ucf101": _list_ucf101,
        "hmdb51": _list_hmdb51,
        "esc50": _list_esc50,
        "generic": _list_generic,
    }[layout](src, name, audio_only or layout == "esc50", skip)
    _check_duplicate_keys(listing)
    return listing


def _dataset_name(folder: str) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "_", folder.lower()).strip("_-")
    return name or "dataset"


def _check_duplicate_keys(listing: Listing) -> None:
    # Keys hash the source path, so two items share a key only when they share a source: a file listed twice.
    seen: dict[str, Item] = {}
    for item in listing.items:
        key = item.key(listing.dataset)
        if key in seen and item.error is None:
            item.error = f"duplicate key: {key} is also the key of {seen[key].source}"
        seen.setdefault(key, item)


# --------------------------------------------------------------------------------------------------- Kinetics


_KINETICS_CSV = {"train.csv": "train", "validate.csv": "val", "val.csv": "val", "test.csv": "test"}


def _kinetics_csvs(src: Path) -> list[Path]:
    found = []
    for folder in (src, src / "annotations", *(d / "annotations" for d in _subdirs(src))):
        for name in _KINETICS_CSV:
            path = folder / name
            if path.is_file():
                with open(path, newline="", encoding="utf-8-sig") as f:
                    header = f.readline()
                if "youtube_id" in header:
                    found.append(path)
        if found:
            return found
    return found


def _list_kinetics(src: Path, dataset: str, audio_only: bool, skip: Path | None) -> Listing:
    csvs = _kinetics_csvs(src)
    if not csvs:
        raise LayoutError(
            f"{src}: no Kinetics annotation CSV (train.csv / validate.csv / test.csv with a youtube_id column) "
            "at the top or in annotations/"
        )
    rows: list[tuple[str, int, dict[str, str]]] = []
    for path in csvs:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
            if missing:
                raise LayoutError(f"{path}: header lacks {sorted(missing)} (expected label,youtube_id,...)")
            for line, row in enumerate(reader, start=2):
                rows.append((path.name, line, row))
    classes = sorted({(row.get("label") or "").strip() for _, _, row in rows} - {""})
    class_ids = {name: i for i, name in enumerate(classes)}

    files = walk_files(src, VIDEO_EXTENSIONS | (AUDIO_EXTENSIONS if audio_only else frozenset()), skip)
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)

    items: list[Item] = []
    claimed: dict[Path, Item] = {}
    first_listing: dict[Path, str] = {}
    for csv_name, line, row in rows:
        split = _KINETICS_CSV[csv_name]
        label_name = (row.get("label") or "").strip()
        yid = (row.get("youtube_id") or "").strip()
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except (TypeError, ValueError):
            items.append(
                Item(
                    source=f"{csv_name}:{line}",
                    path=None,
                    split=split,
                    error=f"bad annotation: {csv_name} line {line} has time_start/time_end "
                    f"{row.get('time_start')!r}/{row.get('time_end')!r}",
                )
            )
            continue
        stem = f"{yid}_{start:06d}_{end:06d}"
        where = f"{csv_name} line {line}"
        label = class_ids.get(label_name, -1)
        extra = {"youtube_id": yid, "time_start": start, "time_end": end}
        candidates = by_stem.get(stem) or by_stem.get(yid) or []
        # Prefer the copy under the split's own folder (`train/`, `val/`, ...), then the shortest path.
        candidates = sorted(candidates, key=lambda p: (_split_of(src, p) != split, len(p.parts), str(p)))
        if not candidates:
            items.append(
                Item(
                    source=f"{split}/{stem}.mp4",
                    path=None,
                    split=split,
                    label=label,
                    label_name=label_name,
                    extra=extra,
                    error=f"missing file: listed in {where} but no file named {stem}.* under {src}",
                )
            )
            continue
        path = candidates[0]
        if path in claimed:
            previous = claimed[path]
            if (previous.split, previous.label_name) != (split, label_name):
                previous.error = (
                    f"conflicting listings: {first_listing[path]} as {previous.split}/{previous.label_name!r} "
                    f"and {where} as {split}/{label_name!r}"
                )
            else:
                previous.notes.append(f"duplicate listing ignored: {where} repeats {first_listing[path]}")
            continue
        item = _file_item(src, path, split=split, label=label, label_name=label_name, extra=extra)
        claimed[path] = item
        first_listing[path] = where
        items.append(item)
        for other in candidates[1:]:
            if other not in claimed:
                dup = _file_item(
                    src, other, split=split, label=label, label_name=label_name, extra=dict(extra)
                )
                dup.error = dup.error or f"duplicate clip: same clip as {item.source} ({where})"
                claimed[other] = dup
                items.append(dup)
    for path in files:
        if path not in claimed:
            item = _file_item(src, path, split=_split_of(src, path) or "train")
            item.error = (
                item.error or f"not annotated: no row of {', '.join(p.name for p in csvs)} lists this clip"
            )
            items.append(item)
    return Listing(
        layout="kinetics",
        dataset=dataset,
        classes=classes,
        items=items,
        fold_dataset=False,
        audio_only=audio_only,
        described=[str(p.relative_to(src)) for p in csvs],
    )


def _split_of(src: Path, path: Path) -> str | None:
    for part in path.relative_to(src).parts[:-1]:
        split = _SPLIT_DIRS.get(part.lower())
        if split is not None:
            return split
    return None


# ------------------------------------------------------------------------------------------- fold datasets


def _video_root(src: Path, classes: list[str]) -> Path:
    """The folder (src or one of its children) that holds the most class folders."""
    wanted = {c.lower() for c in classes}

    def score(folder: Path) -> int:
        return sum(1 for d in _subdirs(folder) if d.name.lower() in wanted)

    best = max([src, *_subdirs(src)], key=score)
    if score(best) == 0:
        raise LayoutError(
            f"{src}: found the split files but no class folders ({', '.join(classes[:3])}, ...) next to them "
            "or one level down"
        )
    return best


def _read_lines(path: Path) -> list[tuple[int, str]]:
    # Split files of the original releases end lines with \r\n and may carry trailing spaces.
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _fold_listing(
    layout: str,
    src: Path,
    dataset: str,
    classes: list[str],
    listed: dict[str, dict[str, str]],
    listed_where: dict[str, tuple[str, str]],
    audio_only: bool,
    skip: Path | None,
    unlisted_reason: str,
    folds: list[str],
    described: list[str],
) -> Listing:
    """The listing of a class-folder tree whose fold membership comes from split files (UCF101, HMDB51).

    `listed` maps a lower-cased `<class>/<file>` to {fold: train/test}; `listed_where` maps it to the name as
    written and the split file line that first lists it.
    Matching is case-insensitive (UCF101's HandstandPushups folder holds v_HandStandPushups_* files).
    """
    video_root = _video_root(src, classes)
    extensions = VIDEO_EXTENSIONS | (AUDIO_EXTENSIONS if audio_only else frozenset())
    class_ids = {name.lower(): i for i, name in enumerate(classes)}
    items: list[Item] = []
    seen: set[str] = set()
    for path in walk_files(video_root, extensions, skip):
        rel = path.relative_to(video_root)
        source_item = _file_item(src, path, split=FOLD_SPLIT)
        if len(rel.parts) < 2:
            source_item.error = source_item.error or "not in a class folder: expected <class>/<file>"
            items.append(source_item)
            continue
        folder = rel.parts[0]
        if folder.lower() not in class_ids:
            source_item.error = source_item.error or f"unknown class folder {folder!r}: not in the class list"
            items.append(source_item)
            continue
        # The class comes from the folder, never from the file name.
        source_item.label = class_ids[folder.lower()]
        source_item.label_name = classes[source_item.label]
        match = f"{folder}/{rel.name}".lower()
        seen.add(match)
        membership = listed.get(match)
        if membership is None:
            source_item.error = source_item.error or unlisted_reason
        source_item.folds = dict(sorted(membership.items())) if membership is not None else None
        items.append(source_item)
    prefix = "" if video_root == src else _rel(src, video_root) + "/"
    for match, (written, where) in listed_where.items():
        if match not in seen:
            label = class_ids.get(match.partition("/")[0], -1)
            items.append(
                Item(
                    source=prefix + written,
                    path=None,
                    split=FOLD_SPLIT,
                    label=label,
                    label_name=classes[label] if label >= 0 else "",
                    folds=dict(sorted(listed[match].items())),
                    error=f"missing file: listed in {where} but absent from {video_root}",
                )
            )
    return Listing(
        layout=layout,
        dataset=dataset,
        classes=classes,
        items=items,
        fold_dataset=True,
        audio_only=audio_only,
        folds=sorted(set(folds), key=int),
        described=described,
    )


def _list_ucf101(src: Path, dataset: str, audio_only: bool, skip: Path | None) -> Listing:
    lists = _find_dir(src, "ucfTrainTestlist")
    if lists is None or not (lists / "classInd.txt").is_file():
        raise LayoutError(f"{src}: UCF101 needs ucfTrainTestlist/classInd.txt")
    classes = []
    for n, line in _read_lines(lists / "classInd.txt"):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise LayoutError(
                f"{lists / 'classInd.txt'} line {n}: expected '<id> <ClassName>' with ids 1, 2, ..."
            )
        classes.append(parts[1])
    listed: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    folds = []
    for kind in ("train", "test"):
        for path in sorted(lists.glob(f"{kind}list0[0-9].txt")):
            fold = str(int(path.stem[-2:]))
            folds.append(fold)
            for n, line in _read_lines(path):
                name = line.split()[0].replace("\\", "/")
                match = name.lower()
                listed.setdefault(match, {})[fold] = kind
                where.setdefault(match, (name, f"{path.name} line {n}"))
    if not listed:
        raise LayoutError(f"{lists}: no trainlist0N.txt / testlist0N.txt split files")
    return _fold_listing(
        "ucf101", src, dataset, classes, listed, where, audio_only, skip,
        unlisted_reason="not in any split file: no ucfTrainTestlist list",
        folds=folds,
        described=[str(p.relative_to(src)) for p in sorted(lists.glob("*.txt"))],
    )  # fmt: skip


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<fold>\d)\.txt$")


def _hmdb_split_dir(src: Path) -> Path | None:
    for folder in (src, *_subdirs(src), *(d for s in _subdirs(src) for d in _subdirs(s))):
        try:
            if any(_HMDB_SPLIT.match(p.name) for p in folder.iterdir()):
                return folder
        except OSError:
            continue
    return None


def _list_hmdb51(src: Path, dataset: str, audio_only: bool, skip: Path | None) -> Listing:
    split_dir = _hmdb_split_dir(src)
    if split_dir is None:
        raise LayoutError(
            f"{src}: HMDB51 needs <class>_test_split{{1,2,3}}.txt files (testTrainMulti_7030_splits/)"
        )
    files = sorted(p for p in split_dir.iterdir() if _HMDB_SPLIT.match(p.name))
    classes = sorted({_HMDB_SPLIT.match(p.name)["cls"] for p in files})  # type: ignore[index]
    listed: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    folds = set()
    for path in files:
        m = _HMDB_SPLIT.match(path.name)
        assert m is not None
        fold = m["fold"]
        folds.add(fold)
        for n, line in _read_lines(path):
            name, _, code = line.rpartition(" ")
            name = name.strip()
            if code not in ("0", "1", "2") or not name:
                raise LayoutError(f"{path} line {n}: expected '<name>.avi <0|1|2>', got {line!r}")
            match = f"{m['cls']}/{name}".lower()
            membership = listed.setdefault(match, {})
            # 1 = train, 2 = test, 0 = unused in this split (left out of `folds`).
            if code != "0":
                membership[fold] = "train" if code == "1" else "test"
            where.setdefault(match, (f"{m['cls']}/{name}", f"{path.name} line {n}"))
    return _fold_listing(
        "hmdb51", src, dataset, classes, listed, where, audio_only, skip,
        unlisted_reason=f"not in any split file: no {split_dir.name}/<class>_test_split*.txt line",
        folds=list(folds),
        described=[f"{split_dir.relative_to(src).as_posix() or '.'}/<class>_test_split*.txt ({len(files)} files)"],
    )  # fmt: skip


def _list_esc50(src: Path, dataset: str, audio_only: bool, skip: Path | None) -> Listing:
    meta = src / "meta" / "esc50.csv"
    audio_dir = src / "audio"
    rows = []
    with open(meta, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"filename", "fold", "target", "category"} - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(f"{meta}: header lacks {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            rows.append((line, row))
    names: dict[int, str] = {}
    for line, row in rows:
        target, category = int(row["target"]), row["category"].strip()
        if names.setdefault(target, category) != category:
            raise LayoutError(
                f"{meta} line {line}: target {target} is both {names[target]!r} and {category!r}"
            )
    if sorted(names) != list(range(len(names))):
        raise LayoutError(f"{meta}: targets must be 0..N-1, got {sorted(names)}")
    classes = [names[t] for t in range(len(names))]
    folds = sorted({row["fold"].strip() for _, row in rows}, key=int)
    files = (
        {p.name: p for p in walk_files(audio_dir, AUDIO_EXTENSIONS | VIDEO_EXTENSIONS, skip)}
        if audio_dir.is_dir()
        else {}
    )
    items = []
    used = set()
    for line, row in rows:
        name, fold = row["filename"].strip(), row["fold"].strip()
        membership = {f: ("test" if f == fold else "train") for f in folds}
        extra = {k: row[k] for k in ("esc10", "src_file", "take") if k in row}
        label = int(row["target"])
        common = {"split": FOLD_SPLIT, "label": label, "label_name": classes[label], "folds": membership}
        if name in used:
            continue
        used.add(name)
        if name not in files:
            items.append(
                Item(
                    source=f"audio/{name}",
                    path=None,
                    extra=extra,
                    error=f"missing file: listed in meta/esc50.csv line {line} but absent from audio/",
                    **common,
                )
            )
            continue
        items.append(_file_item(src, files[name], extra=extra, **common))
    for name, path in files.items():
        if name not in used:
            item = _file_item(src, path, split=FOLD_SPLIT)
            item.error = item.error or "not annotated: no row of meta/esc50.csv lists this file"
            items.append(item)
    return Listing(
        layout="esc50",
        dataset=dataset,
        classes=classes,
        items=items,
        fold_dataset=True,
        audio_only=True,
        folds=folds,
        described=["meta/esc50.csv"],
    )


# --------------------------------------------------------------------------------------------------- generic


def _list_generic(src: Path, dataset: str, audio_only: bool, skip: Path | None) -> Listing:
    extensions = VIDEO_EXTENSIONS | (AUDIO_EXTENSIONS if audio_only else frozenset())
    top = _subdirs(src)
    split_tree = bool(top) and all(d.name.lower() in _SPLIT_DIRS for d in top)
    files = walk_files(src, extensions, skip)
    class_names = set()
    placed = []
    for path in files:
        parts = path.relative_to(src).parts[:-1]
        if split_tree and parts:
            split, parts = _SPLIT_DIRS[parts[0].lower()], parts[1:]
        else:
            split = "train"
        cls = parts[0] if parts else ""
        if cls:
            class_names.add(cls)
        placed.append((path, split, cls))
    classes = sorted(class_names)
    class_ids = {name: i for i, name in enumerate(classes)}
    items = [
        _file_item(src, path, split=split, label=class_ids.get(cls, -1), label_name=cls)
        for path, split, cls in placed
    ]
    return Listing(
        layout="generic",
        dataset=dataset,
        classes=classes,
        items=items,
        fold_dataset=False,
        audio_only=audio_only,
        described=["<split>/<class>/<file>" if split_tree else "<class>/<file>"],
    )
