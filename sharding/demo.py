"""The built-in audio-visual demo dataset: a generator that writes UCF101's on-disk layout.

Owns the synthetic data the demo, the ablation and many tests run on (issue 2, item 5). It stands in for the
paper's pretraining and downstream video sets (XKD section "Experiments": UCF101, Kinetics-Sound) at laptop scale,
with a class structure built so that cross-modal distillation (paper section "Method", audio -> video KD) has
something to teach: the class is an audio-visual *event type* whose timing drives both streams, while nuisance
factors that carry most of the pixel and spectral variance are drawn independently of the class.

Generative recipe (full write-up with measurements: `docs/demo-data.md`):

* Class = (pattern, rhythm). The pattern is the shape of one large solid object, chosen among mirror-symmetric
  orientation patterns (horizontal bar, vertical bar, plus, saltire, disc, ring), so that the paper's horizontal
  flips and colour jitter never change the class. The rhythm is the event rate: "Slow" (about 1 event/s) or
  "Fast" (about 3 events/s), with random phase and jitter.
* Each event moves the object to a new random position (video) and strikes a tone burst (audio) on the same video
  frame; the tone's pitch encodes the pattern, the burst rate the rhythm.
* Nuisance, independent of the class: background colour, panning colour gratings, a static fine texture, a
  drifting soft blob (smooth motion that is not an event), object colour and size, sensor noise (video);
  pitch jitter, timbre, decay, coloured background noise and loudness (audio). The object adds about 30% of the
  pixel variance, so a pixel reconstruction objective mostly models the background.

Output (`--out DIR`): `DIR/UCF-101/<Class>/v_<Class>_gGG_cCC.avi` (MPEG-4 part 2 video + MP3 audio, as UCF101's
DivX/MP3 AVIs) and `DIR/ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt` with `\\r\\n` line ends. Train and
test are split by group as in UCF101 (the first groups are test). Every clip is a pure function of
(seed, class, clip index), so the output is identical for a given seed whatever `--workers` is.

Usage: `python -m xkd.sharding.demo --out data/demo/raw [--mini] [--classes N] [--clips-per-class N] [--size PX]
[--seed S] [--workers N]` (console script `xkd-demo-data`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
from av.codec.context import Flags
from tqdm import tqdm

# Mirror-symmetric object patterns (name, pitch of its tone in Hz). Symmetric under horizontal flips so the
# paper's flip augmentation never turns one class into another; pitches are 1.5x apart (well separated in a
# Slaney mel scale of 80 bins up to 8 kHz).
PATTERNS: tuple[tuple[str, float], ...] = (
    ("HBar", 300.0),
    ("VBar", 450.0),
    ("Plus", 675.0),
    ("Cross", 1012.5),
    ("Disc", 1518.75),
    ("Ring", 2278.125),
)
# Rhythms (name, mean events per second). 3x apart, so event counts stay separable under jitter and under
# 2x temporal subsampling of the 8 fps video (a jump persists until the next one).
RHYTHMS: tuple[tuple[str, float], ...] = (("Slow", 1.0), ("Fast", 3.0))
MAX_CLASSES = len(PATTERNS) * len(RHYTHMS)

UCF_GROUPS = 25  # UCF101 has 25 groups (g01..g25) per class
# Groups g01..g08 of 25 form the test split (UCF101's split 1 uses g01..g07), so the default test set has 1,000+ clips.
UCF_TEST_GROUPS = 8

# libmp3lame's encoder delay (576) plus the MP3 decoder's delay (529): a decoded MP3 starts this many samples late.
# The waveform is written this many samples early so the decoded audio lines up with the video frames.
MP3_DELAY_SAMPLES = 1105
VIDEO_QUANTISER = 5  # MPEG-4 constant quantiser (2 = best, 31 = worst): about 25 KB of video per 64 px clip
AUDIO_BIT_RATE = 24000  # MP3 bits per second: 12 KB per clip, ample for tone bursts over noise

# Nuisance strengths, in intensity units of [0, 1] per RGB channel. With these the class-bearing object adds about
# 30% of the pixel variance and the background the rest (measured in docs/benchmarks/demo-learnability.md).
GRATING = 0.3  # amplitude bound of each of the 3 background gratings
BLOB = 0.4  # colour amplitude bound of the drifting soft blob
CONTRAST = (
    0.25,
    0.4,
)  # luminance step of the object from the background's mean colour  # MP3 bits per second: about 12 KB per clip, transparent for tones over noise


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. Defaults are the demo dataset (`data/demo/raw`)."""

    classes: int = 10
    """Number of classes (2..12); class c is pattern c // 2 with rhythm c % 2."""
    clips_per_class: int = 350
    """Clips per class, spread round-robin over up to 25 groups."""
    size: int = 64
    """Frame width and height in pixels."""
    fps: int = 8
    """Video frame rate (frames per second); the demo is sharded with `--fps 8`."""
    clip_seconds: float = 4.0
    """Duration of every clip in seconds (video and audio)."""
    sample_rate: int = 16000
    """Audio sample rate in Hz (mono)."""
    seed: int = 0
    """Master seed: every clip is a pure function of (seed, class, clip index)."""

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"--classes {self.classes}: the demo generator makes 2..{MAX_CLASSES} classes")
        if self.clips_per_class < 2:
            raise ValueError(
                f"--clips-per-class {self.clips_per_class}: need at least 2 (one train, one test)"
            )
        if self.size < 16 or self.size % 2:
            raise ValueError(f"--size {self.size}: use an even frame size of at least 16 pixels")
        if self.fps < 4 or self.clip_seconds * self.fps < 8:
            raise ValueError(
                "the clip needs at least 8 frames at >= 4 fps so that the Fast rhythm is visible"
            )

    @property
    def num_frames(self) -> int:
        return round(self.clip_seconds * self.fps)

    @property
    def num_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def groups(self) -> int:
        return min(UCF_GROUPS, self.clips_per_class)

    @property
    def test_groups(self) -> int:
        # Keep the UCF-like 8/25 test fraction, with at least one group on each side.
        return min(self.groups - 1, max(1, round(self.groups * UCF_TEST_GROUPS / UCF_GROUPS)))


MINI = DemoSpec(classes=3, clips_per_class=4)


def class_names(classes: int) -> list[str]:
    """UCF-style CamelCase class names, e.g. `HBarSlow`, `HBarFast`, `VBarSlow`, ..."""
    return [PATTERNS[c // len(RHYTHMS)][0] + RHYTHMS[c % len(RHYTHMS)][0] for c in range(classes)]


def clip_path(name: str, clip: int, spec: DemoSpec) -> str:
    """The UCF101-style relative path of clip `clip` (0-based) of class `name`: group round-robin, then index."""
    group, index = clip % spec.groups + 1, clip // spec.groups + 1
    return f"{name}/v_{name}_g{group:02d}_c{index:02d}.avi"


def is_test_clip(clip: int, spec: DemoSpec) -> bool:
    """Whether clip `clip` (0-based) of any class is in `testlist01` (its group is one of the first groups)."""
    return clip % spec.groups < spec.test_groups


def event_frames(rate: float, spec: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """Frame indices (int, increasing, >= 1) at which an event happens: a jittered periodic rhythm.

    Events sit on the video frame grid so that the object's jump and the tone's onset coincide exactly.
    """
    period = spec.fps / rate  # in frames
    t = rng.uniform(0.0, period) + period * np.arange(math.ceil(spec.num_frames / period) + 1)
    t = t + rng.uniform(-0.15, 0.15, size=t.shape) * period
    frames = np.unique(np.round(t).astype(np.int64))
    frames = frames[(frames >= 1) & (frames < spec.num_frames)]
    # At least 2 frames between events, so every position is seen before the object jumps again.
    keep = [frames[0]] if len(frames) else []
    for f in frames[1:]:
        if f - keep[-1] >= 2:
            keep.append(f)
    return np.asarray(keep, dtype=np.int64)


def _object_mask(pattern: str, cx: float, cy: float, scale: float, grid: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a pattern centred at (cx, cy), sized relative to `scale` px.

    Every pattern covers about 15% of a `scale` x `scale` frame, so object area (hence mean colour and contrast)
    says nothing about the class; only the arrangement of its edges does.
    """
    dx, dy = grid[0] - cx, grid[1] - cy

    def bar(angle: float, length: float, width: float) -> np.ndarray:  # signed distance to a rectangle
        c, s = math.cos(angle), math.sin(angle)
        along, across = np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c)
        return np.maximum(along - length * scale / 2, across - width * scale / 2)

    if pattern == "HBar":
        dist = bar(0.0, 0.75, 0.2)
    elif pattern == "VBar":
        dist = bar(math.pi / 2, 0.75, 0.2)
    elif pattern in ("Plus", "Cross"):
        a = 0.0 if pattern == "Plus" else math.pi / 4
        dist = np.minimum(bar(a, 0.6, 0.14), bar(a + math.pi / 2, 0.6, 0.14))
    elif pattern == "Disc":
        dist = np.hypot(dx, dy) - 0.22 * scale
    elif pattern == "Ring":
        dist = np.abs(np.hypot(dx, dy) - 0.24 * scale) - 0.05 * scale
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.clip(0.5 - dist, 0.0, 1.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def render_video(
    pattern: str, events: np.ndarray, spec: DemoSpec, rng: np.random.Generator, show_object: bool = True
) -> np.ndarray:
    """The frames (T, H, W, 3) uint8 of one clip: a large object that jumps at each event over a busy background.

    `show_object=False` draws the same clip (same random draws) without the object, to measure its share of the
    pixel variance.
    """
    size, n = spec.size, spec.num_frames
    grid = np.mgrid[0:size, 0:size].astype(np.float64)[::-1] + 0.5  # (2, H, W): x then y, pixel centres

    # Background (nuisance): mean colour, 3 panning colour gratings, a static fine texture, a large soft blob
    # drifting smoothly (motion that is not an event) and sensor noise.
    mean = rng.uniform(0.2, 0.8, size=3)
    freqs = rng.uniform(1.0, 6.0, size=3) * 2 * math.pi / size  # 1..6 cycles per frame
    angles = rng.uniform(0.0, math.pi, size=3)
    amps = rng.uniform(-GRATING, GRATING, size=(3, 3))  # (grating, RGB)
    phases = rng.uniform(0.0, 2 * math.pi, size=3)
    pan = rng.uniform(-1.0, 1.0, size=2) * size / 64  # (x, y) pixels per frame
    texture = rng.normal(0.0, rng.uniform(0.01, 0.05), size=(size, size, 3))
    blob_colour = rng.uniform(-BLOB, BLOB, size=3)
    blob_sigma = rng.uniform(0.15, 0.25) * size
    blob_start = rng.uniform(0.0, size, size=2)
    blob_velocity = rng.uniform(-1.5, 1.5, size=2) * size / 64  # pixels per frame
    noise_sd = rng.uniform(0.0, 0.015)

    # Object (class pattern; size and colour are nuisance). Sizes scale with the frame.
    scale = rng.uniform(0.85, 1.15) * size
    # Colour: the background's mean plus a random tint of zero luminance plus a bounded luminance step (towards
    # the side with room), so the object is always visible but carries only a minority of the pixel variance.
    tint = rng.uniform(-0.2, 0.2, size=3)
    tint -= _luma(tint)
    step = rng.uniform(*CONTRAST) * (1.0 if _luma(mean) < 0.5 else -1.0)
    colour = np.clip(mean + tint + step, 0.0, 1.0)
    lo, hi = 0.3 * size, 0.7 * size
    positions = [rng.uniform(lo, hi, size=2)]
    for _ in events:
        # Every jump moves at least a fifth of the frame, so every event is a visible coarse motion.
        while True:
            p = rng.uniform(lo, hi, size=2)
            if np.hypot(*(p - positions[-1])) >= 0.2 * size:
                break
        positions.append(p)
    segment = np.searchsorted(events, np.arange(n), side="right")  # which position each frame shows

    # Each grating translates by `pan` per frame: sin(base + w t) expanded so all frames come from two images.
    direction = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (3, 2)
    base = (
        freqs[:, None, None] * np.einsum("kc,chw->khw", direction, grid) + phases[:, None, None]
    )  # (3, H, W)
    omega = freqs * (direction @ pan)  # (3,) radians per frame
    wt = omega * np.arange(n)[:, None]  # (T, 3)
    waves = np.cos(wt)[:, None, None, :] * np.sin(base).transpose(1, 2, 0) + np.sin(wt)[
        :, None, None, :
    ] * np.cos(base).transpose(1, 2, 0)  # (T, H, W, 3 gratings)
    background = (mean + texture).astype(np.float32) + waves.astype(np.float32) @ amps.astype(np.float32)
    centre = blob_start + blob_velocity * np.arange(n)[:, None]  # (T, 2)
    dist2 = ((grid[None] - centre[:, :, None, None]) ** 2).sum(1)  # (T, H, W)
    background += np.exp(-dist2 / (2 * blob_sigma**2)).astype(np.float32)[..., None] * blob_colour.astype(
        np.float32
    )

    masks = np.stack([_object_mask(pattern, *p, scale, grid) for p in positions]).astype(np.float32)
    mask = masks[segment][..., None] * show_object  # (T, H, W, 1)
    video = background * (1 - mask) + colour.astype(np.float32) * mask
    video += rng.standard_normal(video.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.clip(video * 255 + 0.5, 0, 255).astype(np.uint8)


def _coloured_noise(n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a 1/f^beta power spectrum (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    x = np.fft.irfft(spec / f ** (beta / 2), n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def render_audio(pitch: float, events: np.ndarray, spec: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """The waveform (S,) float32 in [-1, 1] of one clip: a tone burst at every event over coloured noise."""
    sr, n = spec.sample_rate, spec.num_samples
    f0 = pitch * rng.uniform(0.98, 1.02)
    harmonics = np.array([1.0, rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.25)])  # timbre (nuisance)
    decay = rng.uniform(0.04, 0.1)  # seconds
    burst_t = np.arange(int(0.3 * sr)) / sr
    envelope = np.minimum(burst_t / 0.005, 1.0) * np.exp(-burst_t / decay)
    burst = envelope * sum(a * np.sin(2 * math.pi * f0 * (h + 1) * burst_t) for h, a in enumerate(harmonics))
    tone = np.zeros(n)
    for f in events:
        start = round(f / spec.fps * sr)
        stop = min(n, start + len(burst))
        tone[start:stop] += burst[: stop - start]
    tone /= np.abs(tone).max() + 1e-12
    # Background noise 15-30 dB below the tone peaks, of random colour (nuisance), then a random loudness. The
    # divisor leaves headroom for noise peaks (about 3 RMS at the loudest noise) so nothing clips at -3 dBFS.
    noise = _coloured_noise(n, rng.uniform(0.0, 2.0), rng) * 10 ** (-rng.uniform(15, 30) / 20)
    wave = (tone + noise) * 10 ** (rng.uniform(-20, -3) / 20) / (1 + 3 * 10 ** (-15 / 20))
    return wave.astype(np.float32)


def render_clip(
    label: int, clip: int, spec: DemoSpec, show_object: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (T, H, W, 3) uint8, audio (S,) float32, event frame indices) of clip `clip` of class `label`."""
    rng = np.random.default_rng([spec.seed, label, clip])
    pattern, pitch = PATTERNS[label // len(RHYTHMS)]
    rate = RHYTHMS[label % len(RHYTHMS)][1]
    events = event_frames(rate, spec, rng)
    frames = render_video(pattern, events, spec, rng, show_object)
    audio = render_audio(pitch, events, spec, rng)
    return frames, audio, events


def read_clip(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode a clip with PyAV: (frames (T, H, W, 3) uint8, mono audio (S,) float32, sample rate)."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = []
        for f in container.decode(stream):
            samples = f.to_ndarray()  # planar: (C, S); packed: (1, S * C) interleaved
            channels = samples if f.format.is_planar else samples.reshape(-1, f.layout.nb_channels).T
            chunks.append(channels.mean(0))
        audio = np.concatenate(chunks)
        sample_rate = stream.rate
    return frames, audio.astype(np.float32), sample_rate


def video_cue(frames: np.ndarray, fps: float) -> np.ndarray:
    """Hand-made video features that invert the recipe: [cos 2θ, cos 4θ, edge density, events per second].

    Events are the frames whose mean absolute change stands out above the background's steady pan; the object's
    pattern is read from the orientation statistics (θ = gradient angle) of those frame differences, where the
    static texture cancels and the object appears at its old and new positions.
    """
    gray = frames.astype(np.float64).mean(-1) / 255  # (T, H, W)
    diff = gray[1:] - gray[:-1]  # (T-1, H, W)
    energy = np.abs(diff).mean((1, 2))
    base = np.median(energy)  # the pan's steady change: fewer than half of the frames are jumps
    jumps = energy > base + 0.25 * (energy.max() - base)
    gy, gx = np.gradient(diff[jumps], axis=(1, 2))
    power = gx**2 + gy**2
    angle = np.arctan2(gy, gx)
    total = power.sum() + 1e-12
    cos2, cos4 = (power * np.cos(2 * angle)).sum() / total, (power * np.cos(4 * angle)).sum() / total
    density = np.sqrt(power).sum() / (np.abs(diff[jumps]).sum() + 1e-12)
    return np.array([cos2, cos4, density, jumps.sum() * fps / len(frames)])


def audio_cue(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Hand-made audio features that invert the recipe: [log2 of the tone's pitch in Hz, events per second].

    The pitch is the loudest spectral peak above 200 Hz at any moment (the tone bursts rise well above the
    background noise there); events are the rising edges of the energy envelope around that pitch.
    """
    hop, n_fft = 128, 1024
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    spec = np.abs(np.fft.rfft(frames, axis=1))  # (frames, bins)
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    band = freqs >= 200
    peak = int(np.argmax(spec[:, band].max(0))) + int(np.argmax(band))
    envelope = spec[:, max(peak - 2, 0) : peak + 3].sum(1)
    above = envelope > 0.25 * envelope.max()
    onsets = np.count_nonzero(above[1:] & ~above[:-1]) + int(above[0])
    return np.array([math.log2(freqs[peak]), onsets * sample_rate / len(audio)])


def write_avi(path: Path, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
    """Encode MPEG-4 part 2 video + MP3 audio into an AVI (UCF101's container and codecs), bit-exactly."""
    # Write the waveform early by the MP3 delay (padding the tail) so decoded audio is in sync with the frames.
    audio = np.concatenate([audio[MP3_DELAY_SAMPLES:], np.zeros(MP3_DELAY_SAMPLES, dtype=audio.dtype)])
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)[None]  # (1, S) planar-compatible mono
    with av.open(str(path), "w", format="avi", options={"fflags": "+bitexact"}) as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.codec_context.gop_size = 8  # a keyframe every second at 8 fps: cheap random access
        video.codec_context.thread_count = 1  # single-threaded encoding is bit-reproducible
        video.codec_context.flags |= Flags.bitexact
        video.codec_context.qmin = video.codec_context.qmax = VIDEO_QUANTISER
        sound = out.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        sound.bit_rate = AUDIO_BIT_RATE
        sound.codec_context.flags |= Flags.bitexact
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        chunk.sample_rate = sample_rate
        out.mux(sound.encode(chunk))
        out.mux(sound.encode())


def _write_one(job: tuple[Path, int, int, DemoSpec]) -> None:
    path, label, clip, spec = job
    frames, audio, _ = render_clip(label, clip, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write under a hidden name, then rename: an interrupted run never leaves a truncated `.avi` behind.
    part = path.with_name(f".{path.name}.part")
    write_avi(part, frames, audio, spec.fps, spec.sample_rate)
    part.replace(path)


def write_split_files(out: Path, spec: DemoSpec) -> None:
    """`ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt`, formatted as UCF101's (1-based ids, CRLF)."""
    names = class_names(spec.classes)
    lists = out / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for label, name in enumerate(names):
        for clip in range(spec.clips_per_class):
            rel = clip_path(name, clip, spec)
            (test if is_test_clip(clip, spec) else train).append((rel, label))
    # UCF101 lists clips sorted by path; newline="" keeps our explicit \r\n on every platform.
    with open(lists / "classInd.txt", "w", newline="") as f:
        f.writelines(f"{i + 1} {name}\r\n" for i, name in enumerate(names))
    with open(lists / "trainlist01.txt", "w", newline="") as f:
        f.writelines(f"{rel} {label + 1}\r\n" for rel, label in sorted(train))
    with open(lists / "testlist01.txt", "w", newline="") as f:
        f.writelines(f"{rel}\r\n" for rel, _ in sorted(test))


def generate(out: Path, spec: DemoSpec, workers: int = 1, progress: bool = False) -> int:
    """Write the dataset under `out` (UCF-101/ and ucfTrainTestlist/); returns the number of clips written.

    Clips already there under the same names are overwritten (a rerun with another seed never mixes two
    datasets); a folder holding other clips, e.g. from a run with more classes or clips, is refused.
    """
    names = class_names(spec.classes)
    jobs = [
        (out / "UCF-101" / clip_path(name, clip, spec), label, clip, spec)
        for label, name in enumerate(names)
        for clip in range(spec.clips_per_class)
    ]
    planned = {job[0] for job in jobs}
    for leftover in (out / "UCF-101").glob("*/.*.part"):
        leftover.unlink()  # from an interrupted run
    stale = sorted(p for p in (out / "UCF-101").glob("*/*.avi") if p not in planned)
    if stale:
        raise FileExistsError(
            f"{out} holds {len(stale)} clips that these parameters do not make (e.g. {stale[0]}): "
            "delete the folder or choose another --out"
        )
    write_split_files(out, spec)
    bar = tqdm(total=len(jobs), desc="demo clips", unit="clip", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _write_one(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=8):
                bar.update()
    bar.close()
    return len(jobs)


def parse_args(argv: list[str] | None = None) -> tuple[Path, DemoSpec, int]:
    default = DemoSpec()
    p = argparse.ArgumentParser(
        prog="xkd-demo-data",
        description="Generate the built-in audio-visual demo dataset in UCF101's on-disk layout.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("data/demo/raw"), help="output folder (default data/demo/raw)"
    )
    p.add_argument("--mini", action="store_true", help="3 classes x 4 clips, for fast tests")
    p.add_argument(
        "--classes", type=int, help=f"number of classes, 2..{MAX_CLASSES} (default {default.classes})"
    )
    p.add_argument("--clips-per-class", type=int, help=f"clips per class (default {default.clips_per_class})")
    p.add_argument("--size", type=int, help=f"frame width and height in pixels (default {default.size})")
    p.add_argument("--seed", type=int, default=default.seed, help="master seed (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    a = p.parse_args(argv)
    spec = replace(MINI if a.mini else default, seed=a.seed)
    overrides = {"classes": a.classes, "clips_per_class": a.clips_per_class, "size": a.size}
    try:
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        p.error(str(e))
    return a.out, spec, a.workers


def main(argv: list[str] | None = None) -> None:
    out, spec, workers = parse_args(argv)
    start = time.perf_counter()
    try:
        n = generate(out, spec, workers=workers, progress=True)
    except FileExistsError as e:
        raise SystemExit(f"xkd-demo-data: error: {e}") from None
    test = spec.classes * sum(is_test_clip(c, spec) for c in range(spec.clips_per_class))
    print(
        f"wrote {n} clips ({spec.classes} classes, {n - test} train / {test} test) to {out} in "
        f"{time.perf_counter() - start:.1f} s: {spec.size}x{spec.size} px, {spec.fps} fps, {spec.clip_seconds:g} s, "
        f"{spec.sample_rate} Hz mono audio, seed {spec.seed}"
    )
    print(f"classes: {', '.join(class_names(spec.classes))}")


if __name__ == "__main__":
    main()
