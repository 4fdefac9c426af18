"""Fixtures for the sharding tests: tiny generated media (every bad-input case of issue 3) and helpers to read
shard sets back. Media come from imageio-ffmpeg's ffmpeg binary with lavfi sources; nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import av
import imageio_ffmpeg
import numpy as np
import pytest

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_av(
    path: Path,
    seconds: float = 1.5,
    size: str = "64x48",
    rate: int = 25,
    audio: bool = True,
    vcodec: tuple[str, ...] = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
    acodec: tuple[str, ...] = ("-c:a", "aac"),
    video_filter: str | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """A test-pattern video with a 440 Hz tone (44.1 kHz stereo) unless `audio` is False."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    args += [*vcodec]
    if audio:
        args += [*acodec, "-ac", "2"]
    if video_filter:
        args += ["-vf", video_filter]
    ffmpeg(*args, *extra, str(path))
    return path


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prototype files, one per case; trees copy them under the names their layout needs."""
    d = tmp_path_factory.mktemp("media")
    m: dict[str, Path] = {}
    m["av"] = make_av(d / "av.mp4")
    m["av2"] = make_av(d / "av2.mp4", seconds=2.0, size="80x60", rate=30)
    # UCF101-like: MPEG-4 part 2 in AVI with MP3 audio; and a silent one.
    m["avi"] = make_av(d / "ucf.avi", vcodec=("-c:v", "mpeg4"), acodec=("-c:a", "libmp3lame"))
    m["silent"] = make_av(d / "silent.avi", audio=False, vcodec=("-c:v", "mpeg4"))
    m["long"] = make_av(d / "long.mp4", seconds=4.5)
    m["short"] = make_av(d / "short.mp4", seconds=0.4)
    # Odd frame size (4:4:4 chroma allows it; lavfi sources round sizes to even).
    m["odd"] = make_av(
        d / "odd.mp4",
        video_filter="scale=65:49,format=yuv444p",
        vcodec=("-c:v", "libx264", "-preset", "ultrafast"),
    )
    # Variable frame rate: drop 2 of every 3 frames after the first 10, keep the timestamps.
    m["vfr"] = make_av(
        d / "vfr.mp4",
        seconds=2.0,
        video_filter="select='lt(n\\,10)+not(mod(n\\,3))'",
        extra=("-fps_mode", "vfr"),
    )
    rotated = d / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(m["av"]), "-c", "copy", str(rotated))
    m["rotated"] = rotated
    audio_only = d / "audio_only.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:sample_rate=48000:duration=1.5",
        "-c:a",
        "aac",
        str(audio_only),
    )
    m["audio_only"] = audio_only
    wav = d / "clip.wav"
    ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=2:c=pink:r=44100:a=0.3", "-ac", "1", str(wav))
    m["wav"] = wav
    # Truncated files: moov at the end (unreadable) and at the start (the first part decodes).
    data = m["long"].read_bytes()
    (d / "trunc_tail.mp4").write_bytes(data[: len(data) // 2])
    m["trunc_tail"] = d / "trunc_tail.mp4"
    faststart = d / "faststart.mp4"
    ffmpeg("-i", str(m["long"]), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    (d / "trunc_head.mp4").write_bytes(data[: int(len(data) * 0.6)])
    m["trunc_head"] = d / "trunc_head.mp4"
    (d / "text.mp4").write_text("this is not a video\n")
    m["text"] = d / "text.mp4"
    (d / "empty.mp4").write_bytes(b"")
    m["empty"] = d / "empty.mp4"
    # A/V alignment probe: video starts 0.5 s after the audio; a white flash and a 1 kHz beep both at 1.5 s
    # of source time.
    delayed = d / "delayed.mp4"
    ffmpeg(
        "-itsoffset", "0.5", "-f", "lavfi",
        "-i", "color=c=black:s=64x48:r=25:d=2.5,drawbox=w=64:h=48:color=white:t=fill:enable='between(t,1.0,1.2)'",
        "-f", "lavfi", "-i", "aevalsrc='if(between(t,1.5,1.7),0.5*sin(2*PI*1000*t),0)':s=44100:d=3",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(delayed),
    )  # fmt: skip
    m["delayed"] = delayed
    return m


def put(media: dict[str, Path], case: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(media[case], dest)
    return dest


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every sample of every shard in `out` (fails on a duplicated key)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                sample = samples.setdefault(key, {})
                assert ext not in sample, f"{member.name} twice"
                sample[ext] = data
                sample.setdefault("__shard__", shard.name.encode())
    return samples


def frames_digest(video: bytes) -> tuple[int, str]:
    """(frame count, sha1 over the decoded frames' pixels) of an encoded clip."""
    h = hashlib.sha1()
    n = 0
    with av.open(io.BytesIO(video)) as container:
        for frame in container.decode(video=0):
            h.update(frame.to_ndarray(format="rgb24").tobytes())
            n += 1
    return n, h.hexdigest()


def content_of(out: Path) -> dict[str, tuple[bytes, bytes, tuple[int, str] | None]]:
    """key -> (json bytes, mel bytes, decoded-frame digest): what must be equal between equivalent runs."""
    return {
        key: (s["json"], s["mel.npy"], frames_digest(s["video.mp4"]) if "video.mp4" in s else None)
        for key, s in read_samples(out).items()
    }


def load_meta(sample: dict[str, bytes]) -> dict[str, object]:
    return json.loads(sample["json"])


def load_mel(sample: dict[str, bytes]) -> np.ndarray:
    return np.load(io.BytesIO(sample["mel.npy"]))


def slaney_hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp
    )


def slaney_mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney scale with Slaney area normalisation."""
    fft_freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(f_min), slaney_hz_to_mel(f_max), n_mels + 2))
    weights = np.zeros((n_mels, fft_freqs.size))
    for i in range(n_mels):
        lower = (fft_freqs - edges[i]) / (edges[i + 1] - edges[i])
        upper = (edges[i + 2] - fft_freqs) / (edges[i + 2] - edges[i + 1])
        weights[i] = np.maximum(0.0, np.minimum(lower, upper)) * 2.0 / (edges[i + 2] - edges[i])
    return weights


def numpy_log_mel(y: np.ndarray) -> np.ndarray:
    """Centered STFT (reflect padding, periodic Hann), power 2, Slaney mel, natural log with the eps floor."""
    y = np.asarray(y, dtype=np.float64)
    n_fft, hop = 1024, 143
    padded = np.pad(y, n_fft // 2, mode="reflect")
    frames = 1 + (padded.size - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2  # (frames, 513)
    fb = slaney_filterbank(16000, n_fft, 80, 0.0, 8000.0)
    return np.log(fb @ power.T + 1.1920929e-07)  # (80, frames)


def assert_float16_close(stored: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to float16 rounding (half a unit in the last place) plus float32 arithmetic noise."""
    stored = stored.astype(np.float64)
    tolerance = np.abs(reference) * 2.0**-11 + 2e-3
    worst = np.max(np.abs(stored - reference) - tolerance)
    assert worst <= 0, (
        f"log-mel differs from the NumPy reference by up to {worst:.4g} beyond float16 tolerance"
    )


@pytest.fixture(scope="session")
def sh() -> SimpleNamespace:
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return SimpleNamespace(
        ffmpeg=ffmpeg,
        make_av=make_av,
        put=put,
        read_samples=read_samples,
        frames_digest=frames_digest,
        content_of=content_of,
        load_meta=load_meta,
        load_mel=load_mel,
        slaney_hz_to_mel=slaney_hz_to_mel,
        slaney_mel_to_hz=slaney_mel_to_hz,
        slaney_filterbank=slaney_filterbank,
        numpy_log_mel=numpy_log_mel,
        assert_float16_close=assert_float16_close,
    )
