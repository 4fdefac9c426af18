"""Fixtures for the pipeline tests: tiny VP9 clips, log-mels and tar shards written directly in the shard schema.

Clips are made with the ffmpeg binary of imageio-ffmpeg (no system package) and mels with `xkd.sharding.mel`, so
the tests exercise the pipeline on exactly the member formats `xkd-shard` writes, in a few seconds.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from xkd.pipeline import DataConfig
from xkd.sharding.mel import SAMPLE_RATE, log_mel
from xkd.sharding.schema import JSON_EXT, MEL_EXT, VIDEO_EXT, SampleMeta, make_key, shard_name

FPS = 8
WIDTH, HEIGHT = 64, 48
CLASSES = ["low", "high"]


def encode_vp9(frames: np.ndarray, fps: int = FPS) -> bytes:
    """(T, H, W, 3) uint8 RGB frames -> VP9-in-MP4 bytes, constant fps, a keyframe every 8 frames (as xkd-shard)."""
    t, h, w, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libvpx-vp9", "-g", "8", "-keyint_min", "8"]
    cmd += ["-deadline", "realtime", "-cpu-used", "8", "-crf", "30", "-b:v", "0", "-pix_fmt", "yuv420p"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.mp4"
        subprocess.run([*cmd, str(out)], input=frames.tobytes(), capture_output=True, check=True)
        return out.read_bytes()


def moving_frames(seconds: float, seed: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Smooth moving colour gradients (natural-ish content that VP9 keeps close to the original)."""
    t = np.arange(int(round(seconds * FPS)))[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    phase = seed * 0.7
    r = 128 + 100 * np.sin(0.08 * x + 0.3 * t + phase)
    g = 128 + 100 * np.sin(0.10 * y - 0.2 * t + 2 * phase)
    b = 128 + 100 * np.sin(0.05 * (x + y) + 0.25 * t + 3 * phase)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def tone(seconds: float, segments: list[tuple[float, float]]) -> torch.Tensor:
    """A waveform of sine tones: `segments` are (start_s, frequency) pairs, each lasting until the next."""
    n = int(round(seconds * SAMPLE_RATE))
    time = np.arange(n) / SAMPLE_RATE
    freq = np.zeros(n)
    for start, f in segments:
        freq[time >= start] = f
    return torch.from_numpy(0.5 * np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)).float()


@dataclass
class FakeSample:
    key: str
    meta: SampleMeta
    members: dict[str, bytes]


def make_sample(
    source: str,
    label: int,
    seconds: float,
    frames: np.ndarray | None,
    waveform: torch.Tensor | None,
    split: str = "train",
    has_audio: bool = True,
    folds: dict[str, str] | None = None,
) -> FakeSample:
    """One sample in the shard schema; `frames` None makes an audio-only sample, `waveform` None a silent one."""
    key = make_key("tiny", source)
    if waveform is None:
        waveform = torch.zeros(int(round(seconds * SAMPLE_RATE)))
    mel = log_mel(waveform).numpy().astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    members = {MEL_EXT: buf.getvalue()}
    if frames is not None:
        members[VIDEO_EXT] = encode_vp9(frames)
    meta = SampleMeta(
        key=key,
        dataset="tiny",
        source=source,
        split=split,
        label=label,
        label_name=CLASSES[label],
        duration_s=seconds,
        fps=float(FPS) if frames is not None else 0.0,
        num_frames=len(frames) if frames is not None else 0,
        mel_frames=mel.shape[1],
        has_audio=has_audio,
        folds=folds,
        width=frames.shape[2] if frames is not None else 0,
        height=frames.shape[1] if frames is not None else 0,
    )
    members[JSON_EXT] = meta.to_json()
    return FakeSample(key, meta, members)


def write_shards(out: Path, samples: list[FakeSample], split: str, per_shard: int) -> list[Path]:
    """Tar shards `<split>-NNNNNN.tar` holding `per_shard` samples each, plus a minimal dataset.json."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(0, len(samples), per_shard):
        path = out / shard_name(split, index // per_shard)
        with tarfile.open(path, "w") as tar:
            for sample in samples[index : index + per_shard]:
                for ext, data in sample.members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    (out / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    return paths


def tiny_config(shards: Path, **overrides: object) -> DataConfig:
    """Small geometry for fast tests: 2 s windows of 16 frames at 8 fps, 32 px global / 16 px local views, PyAV
    decoding with CPU augmentation (CPU batches on any machine; the GPU tests ask for the GPU)."""
    base = dict(
        shards=str(shards),
        batch_size=4,
        num_workers=0,
        backend="pyav",
        augment_device="cpu",
        video_frames=16,
        video_size=32,
        video_local_frames=4,
        video_local_size=16,
        audio_mel_frames=224,
        audio_local_mel_frames=56,
        shuffle_buffer=8,
        dali_threads=2,
    )
    base.update(overrides)
    return DataConfig(**base)


@pytest.fixture(scope="session")
def clip_samples() -> list[FakeSample]:
    """12 labelled audio-visual samples of 3-5 s (one silent), made once per session."""
    samples = []
    for i in range(12):
        seconds = 3.0 + (i % 3)
        label = i % 2
        waveform = tone(seconds, [(0.0, 300.0 + 500 * label + 40 * i)])
        samples.append(
            make_sample(
                f"{CLASSES[label]}/clip{i:02d}.mp4",
                label,
                seconds,
                moving_frames(seconds, i),
                waveform,
                has_audio=i != 5,
            )
        )
    return samples


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory, clip_samples: list[FakeSample]) -> Path:
    """`train-*.tar` (4 shards x 3 samples) and `test-*.tar` (3 shards x 4 samples) of the same 12 clips."""
    out = tmp_path_factory.mktemp("tiny_shards")
    write_shards(out, clip_samples, "train", 3)
    test = []
    for s in clip_samples:
        meta = SampleMeta(**{**s.meta.__dict__, "split": "test"})
        test.append(FakeSample(s.key, meta, {**s.members, JSON_EXT: meta.to_json()}))
    write_shards(out, test, "test", 4)
    return out


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test files (which cannot import this conftest under --import-mode=importlib)."""
    return SimpleNamespace(
        encode_vp9=encode_vp9,
        moving_frames=moving_frames,
        tone=tone,
        make_sample=make_sample,
        write_shards=write_shards,
        tiny_config=tiny_config,
        FakeSample=FakeSample,
        FPS=FPS,
        WIDTH=WIDTH,
        HEIGHT=HEIGHT,
    )


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini demo dataset (UCF101 layout, 3 classes x 4 clips of 4 s) sharded by `xkd-shard` itself, 3 samples
    per shard so that 2 readers get whole shards."""
    from xkd.sharding import cli, demo

    root = tmp_path_factory.mktemp("demo")
    demo.main(["--out", str(root / "raw"), "--mini", "--workers", "1"])
    cli.main(
        [
            "--src",
            str(root / "raw"),
            "--out",
            str(root / "shards"),
            "--max-shard-samples",
            "3",
            "--workers",
            "0",
        ]
    )
    return root / "shards"
