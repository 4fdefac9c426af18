"""The `xkd-shard` command: pack a video (or audio) dataset into WebDataset shards with log-mel spectrograms.

Usage:
    xkd-shard --src DIR [--out DIR] [options]   shard a dataset (resumes if --out holds an unfinished run)
    xkd-shard merge OUT                         join the parts of a `--part I/N` fan-out
    xkd-shard verify OUT                        decode every sample, report the bad ones
    xkd-shard stats OUT                         summarise a shard set

This is the offline step before XKD pretraining (paper section "Experiments"; `../shared/contracts.md`, "Shards").
Options come from the dataclasses below: each field is one `--flag` and its docstring is the help text (the house
fallback "argparse generated from dataclasses.fields"; jsonargparse would spell the flags `--max_seconds`, while
the issue and the docs use `--max-seconds`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

from xkd.sharding.encode import CODECS, EncodeParams
from xkd.sharding.layouts import LAYOUTS, LayoutError
from xkd.sharding.manifest import DATASET_JSON, MANIFEST, describe, merge_parts
from xkd.sharding.runner import RunOptions, UsageError, default_out, shard_dataset
from xkd.sharding.verify import verify as verify_out


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` (1 <= I <= N) -> (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected I/N, e.g. 3/16") from None
    if not 1 <= i <= n <= 999:
        raise argparse.ArgumentTypeError(f"--part {text!r}: need 1 <= I <= N <= 999")
    return i, n


def parse_size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024): `256M`, `1G`, `500000`."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected bytes or a number with K, M or G"
        ) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction in [0, 1]")
    return value


@dataclass
class ShardConfig:
    """Options of `xkd-shard --src DIR`."""

    src: Path = field(default=None, metadata={"required": True})  # type: ignore[assignment]
    """Dataset root: Kinetics (annotation CSVs + clips), UCF101 (ucfTrainTestlist/), HMDB51 (split files),
    ESC-50 (meta/esc50.csv) or generic <split>/<class>/file or <class>/file folders."""
    out: Path | None = None
    """Output folder (default: shards/<basename of --src>)."""
    layout: str = field(default="auto", metadata={"choices": ("auto", *LAYOUTS)})
    """Dataset layout; auto detects it from the annotation files."""
    dataset: str | None = None
    """Dataset name, the sample key prefix (default: the layout name, or the folder name for generic trees)."""
    fps: float = 8.0
    """Constant frame rate of the re-encoded video."""
    short_side: int = 128
    """Short side of the re-encoded video in pixels (aspect kept, even sizes; 256 for 224-px fine-tuning)."""
    codec: str = field(default="vp9", metadata={"choices": CODECS})
    """vp9 (decodes in DALI on CPU and GPU) or h264 (GPU decoding only), keyframe every 8 frames."""
    crf: int | None = None
    """Encoder quality (default: 32 for vp9, 23 for h264; lower is better and bigger)."""
    max_seconds: float | None = None
    """Keep only the first this many seconds of each source (default: the whole file)."""
    clip_seconds: float | None = None
    """Cut each source into windows of this length, one sample each, carrying `source_key`."""
    min_seconds: float = 1.0
    """Sources (or last windows) shorter than this are not written."""
    no_audio: str = field(default="silence", metadata={"choices": ("silence", "skip")})
    """Sources without sound: silence (silent log-mel, has_audio false) or skip (a failed row, not counted
    towards --max-failed)."""
    audio_only: bool = False
    """Audio-only samples (log-mel + json, no video); implied by the ESC-50 layout."""
    max_shard_samples: int = 1000
    """At most this many samples per shard."""
    max_shard_bytes: int = field(default=256 << 20, metadata={"type": parse_size})
    """At most this many bytes per shard (K/M/G suffixes allowed)."""
    workers: int | None = None
    """Worker processes (default: one per CPU core; 0 works in this process)."""
    threads: int = 1
    """ffmpeg threads per worker."""
    part: tuple[int, int] | None = field(default=None, metadata={"type": parse_part, "metavar": "I/N"})
    """Process only part I of N (a deterministic, disjoint share of the files); join with `xkd-shard merge`."""
    max_failed: float = field(default=0.05, metadata={"type": _fraction})
    """Exit with status 1 when more than this fraction of the files failed."""
    timeout_s: float = 1800.0
    """Give up on a file whose ffmpeg run takes longer than this (seconds)."""
    overwrite: bool = False
    """Delete what an earlier run (of this part) wrote to --out and start again, instead of resuming."""
    retry_failed: bool = False
    """When resuming, try the files that failed before again."""
    progress: bool = True
    """Show a progress bar (files/s, ETA, failures) on stderr."""


@dataclass
class MergeConfig:
    """Options of `xkd-shard merge OUT`: join `--part I/N` runs that wrote into OUT."""

    out: Path = field(default=None, metadata={"positional": True})  # type: ignore[assignment]
    """Folder holding every part's shards, manifest-pIIIofNNN.parquet and dataset-pIIIofNNN.json."""


@dataclass
class VerifyConfig:
    """Options of `xkd-shard verify OUT`: decode every sample and report the bad ones."""

    out: Path = field(default=None, metadata={"positional": True})  # type: ignore[assignment]
    """Shard folder."""
    workers: int | None = None
    """Processes (default: one per CPU core)."""


@dataclass
class StatsConfig:
    """Options of `xkd-shard stats OUT`."""

    out: Path = field(default=None, metadata={"positional": True})  # type: ignore[assignment]
    """Shard folder."""


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Show a default only when there is one (None means "see the help text").
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


_EPILOG = (
    "Other commands: xkd-shard merge OUT | xkd-shard verify OUT | xkd-shard stats OUT (each has --help)."
)


def build_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field (`max_seconds` -> `--max-seconds`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        epilog=_EPILOG if cls is ShardConfig else None,
        formatter_class=_HelpFormatter,
    )
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if type(None) in args:  # X | None
            kind = next(a for a in args if a is not type(None))
        kwargs: dict[str, object] = {"help": docs.get(f.name, "")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.metadata.get("type", kind)
        for key in ("choices", "metavar", "required"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)  # type: ignore[arg-type]
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **kwargs)  # type: ignore[arg-type]
    return parser


def _parse(cls: type, prog: str, argv: list[str]):
    namespace = build_parser(cls, prog).parse_args(argv)
    return cls(**vars(namespace))


def run(cfg: ShardConfig) -> int:
    try:
        params = EncodeParams(
            fps=cfg.fps,
            short_side=cfg.short_side,
            codec=cfg.codec,
            crf=cfg.crf,
            max_seconds=cfg.max_seconds,
            clip_seconds=cfg.clip_seconds,
            min_seconds=cfg.min_seconds,
            no_audio=cfg.no_audio,
            audio_only=cfg.audio_only,
            threads=cfg.threads,
            timeout_s=cfg.timeout_s,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.max_shard_samples < 1 or cfg.max_shard_bytes < 1 << 16:
        raise UsageError("--max-shard-samples must be >= 1 and --max-shard-bytes >= 64K")
    if cfg.workers is not None and cfg.workers < 0:
        raise UsageError("--workers must be >= 0")
    opts = RunOptions(
        src=cfg.src,
        out=cfg.out if cfg.out is not None else default_out(cfg.src),
        layout=cfg.layout,
        dataset=cfg.dataset,
        part=cfg.part,
        workers=cfg.workers if cfg.workers is not None else (os.cpu_count() or 1),
        max_shard_samples=cfg.max_shard_samples,
        max_shard_bytes=cfg.max_shard_bytes,
        max_failed=cfg.max_failed,
        overwrite=cfg.overwrite,
        retry_failed=cfg.retry_failed,
        progress=cfg.progress,
    )
    return shard_dataset(opts, params)


def merge(cfg: MergeConfig) -> int:
    problems = merge_parts(cfg.out)
    if problems:
        print(f"xkd-shard merge: {cfg.out} cannot be merged:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"xkd-shard merge: wrote {cfg.out / MANIFEST} and {cfg.out / DATASET_JSON}")
    print(describe(cfg.out))
    return 0


def verify(cfg: VerifyConfig) -> int:
    workers = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)
    checked, problems = verify_out(cfg.out, workers)
    for shard, key, problem in problems:
        print(f"BAD  {shard}  {key}  {problem}")
    print(f"xkd-shard verify: {checked} samples checked in {cfg.out}, {len(problems)} problem(s)")
    return 1 if problems or checked == 0 else 0


def stats(cfg: StatsConfig) -> int:
    print(describe(cfg.out))
    return 0


_COMMANDS = {"merge": (MergeConfig, merge), "verify": (VerifyConfig, verify), "stats": (StatsConfig, stats)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `xkd-shard`; returns the exit status (0 ok, 1 too many failures or bad shards, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _COMMANDS:
        cls, command = _COMMANDS[argv[0]]
        prog = f"xkd-shard {argv[0]}"
        argv = argv[1:]
    else:
        cls, command, prog = ShardConfig, run, "xkd-shard"
        if argv and argv[0] == "run":
            argv = argv[1:]
    cfg = _parse(cls, prog, argv)
    try:
        return command(cfg)
    except (LayoutError, UsageError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
