"""The audio front end: decode a soundtrack with PyAV and turn it into a log-mel spectrogram (the one implementation).

XKD's audio input (paper section "Experiments", implementation details; `../shared/xkd-method.md` section 3.3) is
an 80-bin Slaney mel spectrogram of 16 kHz mono audio, n_fft 1024, hop 143 (4 s -> 448 frames), natural log with
a float32-eps floor. `../shared/contracts.md` ("Audio front end") fixes the exact torchaudio call; this module is
that call, and every other part (the sharder here, the pipeline's benchmark of the authors' decode-at-load
approach) imports it instead of re-deriving the parameters.

- `log_mel(waveform, sample_rate)`: the contract's transform on an in-memory waveform.
- `decode_audio(source, start_s, duration_s)`: PyAV decode -> mono -> `torchaudio.functional.resample` to 16 kHz.
- `write_log_mel(source, start_s, duration_s, out_path)`: the same two steps streamed in bounded memory, written
  straight to a `.npy` file; used by `xkd-shard` so an hour-long source never sits in memory. It produces the same
  values as `log_mel(decode_audio(...))` (tests check it) because both the resampler and the STFT are local
  operators: each output block only needs a fixed amount of context, which the streaming code carries over.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch
import torchaudio

SAMPLE_RATE = 16000
N_FFT = 1024
WIN_LENGTH = 1024
HOP_LENGTH = 143
N_MELS = 80
F_MIN = 0.0
F_MAX = 8000.0
LOG_EPS = 1.1920929e-07
"""Floor added before the natural log (float32 machine epsilon, as in the authors' code)."""
SILENCE = math.log(LOG_EPS)
"""The log-mel value of digital silence (about -15.94)."""

# torchaudio.functional.resample's defaults; the streaming resampler must know them to size its context.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99
# Audio is processed in blocks of about this many seconds when streaming (bounds memory per worker).
_STREAM_SECONDS = 30.0

AudioSource = str | os.PathLike | BinaryIO


class NoAudioStream(ValueError):
    """The source has no audio stream."""


def mel_parameters() -> dict[str, object]:
    """The front end's parameters, as recorded in `dataset.json`."""
    return {
        "sample_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "win_length": WIN_LENGTH,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "f_min": F_MIN,
        "f_max": F_MAX,
        "mel_scale": "slaney",
        "norm": "slaney",
        "log_eps": LOG_EPS,
    }


def num_samples(duration_s: float) -> int:
    """Samples at 16 kHz in `duration_s` seconds (rounded to the nearest sample)."""
    return int(round(duration_s * SAMPLE_RATE))


def mel_frames(samples: int) -> int:
    """Log-mel frames of a 16 kHz waveform of `samples` samples (centered STFT): 1 + samples // 143."""
    return 1 + samples // HOP_LENGTH


@functools.cache
def _mel_spectrogram(center: bool) -> torchaudio.transforms.MelSpectrogram:
    # torchaudio's defaults are the HTK scale without normalisation; the contract (and librosa, which the
    # authors used) is Slaney for both.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=N_FFT,
        win_length=WIN_LENGTH,
        hop_length=HOP_LENGTH,
        f_min=F_MIN,
        f_max=F_MAX,
        n_mels=N_MELS,
        power=2.0,
        center=center,
        pad_mode="reflect",
        mel_scale="slaney",
        norm="slaney",
    )


def log_mel(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The contract's log-mel of a waveform.

    Args:
        waveform: (N,) mono or (C, N) multi-channel samples in [-1, 1]; channels are averaged.
        sample_rate: rate of `waveform`; anything but 16 kHz is resampled with `torchaudio.functional.resample`.

    Returns:
        (80, 1 + N16 // 143) float32 natural-log mel spectrogram, N16 = samples at 16 kHz. Not normalised.
    """
    waveform = waveform.to(torch.float32)
    if waveform.dim() == 2:
        waveform = waveform.mean(dim=0)
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be (N,) or (C, N), got shape {tuple(waveform.shape)}")
    if sample_rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, sample_rate, SAMPLE_RATE)
    if waveform.numel() <= N_FFT // 2:
        raise ValueError(
            f"waveform of {waveform.numel()} samples at 16 kHz is too short for a centered {N_FFT}-point STFT "
            f"(needs more than {N_FFT // 2})"
        )
    return torch.log(_mel_spectrogram(True)(waveform) + LOG_EPS)


def silent_log_mel(frames: int) -> torch.Tensor:
    """(80, frames) float32 log-mel of digital silence: what a source without audio gets."""
    return torch.full((N_MELS, frames), SILENCE, dtype=torch.float32)


def _open(source: AudioSource) -> av.container.InputContainer:
    # A user's file name is never parsed as an option or a URL protocol (`a:b.wav`, `-x.wav`): paths are opened
    # through FFmpeg's file protocol explicitly, file objects as they are.
    if isinstance(source, (str, os.PathLike)):
        return av.open("file:" + os.path.abspath(os.fspath(source)), mode="r")
    return av.open(source, mode="r")


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 mono samples in [-1, 1]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_packed:
        # Packed formats come out as (1, samples * channels), interleaved.
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float32, copy=False).mean(axis=0)


def _decode_segments(
    container: av.container.InputContainer, start_s: float, duration_s: float | None
) -> tuple[int, object]:
    """Decode the first audio stream from `start_s` (absolute stream time) for `duration_s` seconds (None: to EOF).

    Returns the source sample rate and a generator of float32 mono numpy chunks, in order, whose concatenation is
    the segment: samples before `start_s` are dropped, a late-starting stream is padded with leading silence, and
    with a `duration_s` the total is padded with trailing silence to exactly round(duration_s * rate) samples.
    """
    streams = [s for s in container.streams.audio if s.codec_context is not None]
    if not streams:
        raise NoAudioStream("no audio stream")
    stream = streams[0]
    rate = stream.codec_context.sample_rate or stream.rate
    if not rate:
        raise ValueError("audio stream has no sample rate")
    stream.thread_type = "AUTO"

    def generate():
        total = None if duration_s is None else int(round(duration_s * rate))
        emitted = 0
        cursor = None  # stream time (s) of the next sample, from the first frame's timestamp onwards
        # Seek only well into the stream: near the start decoding from 0 is cheap and immune to inexact seeks.
        if start_s > 1.0:
            container.seek(int((start_s - 0.5) * av.time_base), backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.sample_rate != rate:
                raise ValueError(f"audio sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
            if cursor is None:
                cursor = frame.time if frame.time is not None else 0.0
                lead = int(round((cursor - start_s) * rate))
                if lead > 0:  # the stream starts after start_s: leading silence
                    lead = lead if total is None else min(lead, total)
                    yield np.zeros(lead, np.float32)
                    emitted += lead
            mono = _to_mono(frame)
            # Samples of this frame that lie before start_s are dropped.
            skip = int(round((start_s - cursor) * rate))
            cursor += mono.shape[0] / rate
            if skip > 0:
                mono = mono[skip:]
            if total is not None:
                mono = mono[: total - emitted]
            if mono.size:
                yield mono
                emitted += mono.size
            if total is not None and emitted >= total:
                return
        if total is not None and emitted < total:
            yield np.zeros(total - emitted, np.float32)

    return rate, generate()


def decode_audio(source: AudioSource, start_s: float = 0.0, duration_s: float | None = None) -> torch.Tensor:
    """Decode a soundtrack segment with PyAV: mono, 16 kHz, float32.

    Args:
        source: a path (opened as `file:<absolute path>`) or a binary file object.
        start_s: segment start in the stream's own time (seconds, as PyAV's `frame.time`).
        duration_s: segment length; None decodes to the end. With a duration the result has exactly
            round(duration_s * 16000) samples (zero-padded if the stream ends early or starts late).

    Raises:
        NoAudioStream: the source has no audio stream.
    """
    with _open(source) as container:
        rate, chunks = _decode_segments(container, start_s, duration_s)
        parts = list(chunks)
    waveform = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.float32))
    if rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, rate, SAMPLE_RATE)
    if duration_s is not None:
        waveform = _fit(waveform, num_samples(duration_s))
    return waveform


def _fit(waveform: torch.Tensor, length: int) -> torch.Tensor:
    if waveform.numel() >= length:
        return waveform[:length]
    return torch.nn.functional.pad(waveform, (0, length - waveform.numel()))


class _StreamResampler:
    """`torchaudio.functional.resample` applied block-wise to a stream, with the same output.

    torchaudio pads the signal with `width` zeros and convolves with stride `orig` (the reduced source rate), so
    output block k (`new` samples) depends only on input samples [k*orig - width, (k+1)*orig + width). Segments
    that start on a block boundary and carry `ctx` blocks of context on each side reproduce the full-signal blocks.
    """

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        gcd = math.gcd(orig_freq, new_freq)
        self.orig_freq, self.new_freq = orig_freq, new_freq
        self.orig, self.new = orig_freq // gcd, new_freq // gcd
        width = math.ceil(_LOWPASS_FILTER_WIDTH * self.orig / (min(self.orig, self.new) * _ROLLOFF))
        self.ctx = width // self.orig + 2  # blocks of context on each side, with a margin
        self.min_blocks = max(1, int(_STREAM_SECONDS * orig_freq) // self.orig)
        self.pending: list[np.ndarray] = []
        self.buffer = np.zeros(0, np.float32)  # input samples from absolute block `base_block` onwards
        self.base_block = 0
        self.block = 0  # next output block to produce
        self.length = 0  # input samples seen

    def _resample(self, stop: int | None, first: int, last: int | None) -> np.ndarray:
        seg = torch.from_numpy(self.buffer[:stop])
        out = torchaudio.functional.resample(seg, self.orig_freq, self.new_freq).numpy()
        lo = (first - self.base_block) * self.new
        return out[lo:] if last is None else out[lo : (last - self.base_block) * self.new]

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Feed input samples; return the output samples that are final now (often none)."""
        self.pending.append(chunk)
        self.length += chunk.size
        ready = self.length // self.orig - self.ctx  # output blocks whose right context has arrived
        if ready - self.block < self.min_blocks:
            return np.zeros(0, np.float32)
        self.buffer = np.concatenate([self.buffer, *self.pending])
        self.pending = []
        out = self._resample((ready + self.ctx - self.base_block) * self.orig, self.block, ready)
        self.block = ready
        # Keep `ctx` blocks of left context for the next segment.
        new_base = max(0, self.block - self.ctx)
        self.buffer = self.buffer[(new_base - self.base_block) * self.orig :]
        self.base_block = new_base
        return out

    def finish(self) -> np.ndarray:
        """The remaining output; the total is ceil(new * length / orig), as torchaudio truncates it."""
        self.buffer = np.concatenate([self.buffer, *self.pending])
        self.pending = []
        if self.buffer.size == 0:
            return np.zeros(0, np.float32)
        return self._resample(None, self.block, None)


class _StreamLogMel:
    """`log_mel` of a 16 kHz stream, frame by frame, with the centered STFT's reflect padding done by hand.

    With center=True, frame t of the STFT is p[t*hop : t*hop + n_fft] of the reflect-padded signal p. The same
    MelSpectrogram with center=False applied to consecutive pieces of p gives the same frames.
    """

    def __init__(self) -> None:
        self.pad = N_FFT // 2
        self.buffer = np.zeros(0, np.float32)  # padded signal p from frame `self.frame` * hop onwards
        self.pending: list[np.ndarray] = []  # signal not yet appended to the buffer (appending is batched)
        self.pending_size = 0
        self.started = False
        self.tail = np.zeros(0, np.float32)  # last pad + 1 signal samples, for the right reflect pad
        self.length = 0
        self.frame = 0
        self.min_frames = int(_STREAM_SECONDS * SAMPLE_RATE) // HOP_LENGTH

    def _frames(self, count: int) -> np.ndarray:
        piece = torch.from_numpy(self.buffer[: (count - 1) * HOP_LENGTH + N_FFT])
        mel = torch.log(_mel_spectrogram(False)(piece) + LOG_EPS)  # (80, count)
        self.buffer = self.buffer[count * HOP_LENGTH :]
        self.frame += count
        return mel.numpy()

    def push(self, chunk: np.ndarray, final: bool = False) -> np.ndarray:
        """Feed 16 kHz samples; return (80, k) float32 log-mel frames that are final now (k may be 0)."""
        self.length += chunk.size
        self.tail = np.concatenate([self.tail[-(self.pad + 1) :], chunk])[-(self.pad + 1) :]
        self.pending.append(chunk)
        self.pending_size += chunk.size
        # Decoded frames are small (often < 1,000 samples): join them only once a streaming block is due.
        due = self.buffer.size + self.pending_size >= (self.min_frames - 1) * HOP_LENGTH + N_FFT + self.pad
        if not (final or due):
            return np.zeros((N_MELS, 0), np.float32)
        signal = np.concatenate(self.pending)
        self.pending, self.pending_size = [], 0
        if not self.started:
            if signal.size <= self.pad:
                raise ValueError(
                    f"audio of {signal.size} samples at 16 kHz is too short for a centered {N_FFT}-point STFT"
                )
            self.buffer = np.concatenate([signal[self.pad : 0 : -1], signal])
            self.started = True
        else:
            self.buffer = np.concatenate([self.buffer, signal])
        if final:
            self.buffer = np.concatenate([self.buffer, self.tail[-2::-1][: self.pad]])
            return self._frames(mel_frames(self.length) - self.frame)
        return self._frames((self.buffer.size - N_FFT) // HOP_LENGTH + 1)


@dataclass
class MelResult:
    """What `write_log_mel` wrote."""

    frames: int
    """Time frames (second dimension) of the (80, frames) float16 array."""
    samples: int
    """16 kHz samples the log-mel was computed from."""
    count: int
    """Elements summed in `total` / `total_sq` (80 * frames)."""
    total: float
    """Sum of the stored (float16) values, in float64."""
    total_sq: float
    """Sum of their squares, in float64."""


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
        "fortran_order": False,
        "shape": shape,
    }
    buffer = _BytesSink()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.data


class _BytesSink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def write_log_mel(
    source: AudioSource | None, start_s: float, duration_s: float | None, out_path: str | os.PathLike
) -> MelResult:
    """Stream a soundtrack segment through `decode_audio` + `log_mel` into a float16 `.npy` of shape (80, T).

    Memory stays bounded by the streaming block (about 30 s of audio) whatever the segment length: the log-mel is
    spooled time-major to a side file and transposed into the `.npy` one mel bin at a time.

    Args:
        source: path or file object, or None for a silent segment (then `duration_s` is required).
        start_s: segment start in stream time (seconds).
        duration_s: segment length; None to the end of the stream. With a duration, T = 1 + round(d * 16000) // 143.
        out_path: the `.npy` file to write.

    Raises:
        NoAudioStream: `source` has no audio stream.
    """
    out_path = Path(out_path)
    spool_path = out_path.with_name(out_path.name + ".spool")
    frames, total, total_sq = 0, 0.0, 0.0
    chunks: list[np.ndarray] = []  # time-major float16 chunks while they fit one streaming block
    spool = None

    def emit(mel: np.ndarray) -> None:
        nonlocal frames, total, total_sq, spool
        if mel.shape[1] == 0:
            return
        half = mel.T.astype(np.float16)  # (k, 80)
        wide = half.astype(np.float64)
        total += float(wide.sum())
        total_sq += float(np.square(wide).sum())
        frames += half.shape[0]
        chunks.append(half)
        if len(chunks) > 1 or spool is not None:
            if spool is None:
                spool = open(spool_path, "wb")  # noqa: SIM115 (closed below, also on error)
            for chunk in chunks:
                spool.write(chunk.tobytes())
            chunks.clear()

    try:
        if source is None:
            if duration_s is None:
                raise ValueError("a silent segment needs a duration")
            samples = num_samples(duration_s)
            emit(np.full((N_MELS, mel_frames(samples)), SILENCE, np.float32))
        else:
            samples = _stream(source, start_s, duration_s, emit)
        with open(out_path, "wb") as f:
            f.write(_npy_header((N_MELS, frames)))
            if spool is None:
                f.write(np.ascontiguousarray(np.concatenate(chunks).T).tobytes())
            else:
                spool.close()
                spooled = np.memmap(spool_path, dtype=np.float16, mode="r", shape=(frames, N_MELS))
                for m in range(N_MELS):
                    f.write(np.ascontiguousarray(spooled[:, m]).tobytes())
                del spooled
    finally:
        if spool is not None:
            spool.close()
            spool_path.unlink(missing_ok=True)
    return MelResult(frames=frames, samples=samples, count=frames * N_MELS, total=total, total_sq=total_sq)


def _stream(source: AudioSource, start_s: float, duration_s: float | None, emit) -> int:
    """Decode, resample and log-mel a segment block by block, handing each block to `emit`; return the
    number of 16 kHz samples."""
    with _open(source) as container:
        rate, chunks = _decode_segments(container, start_s, duration_s)
        resampler = _StreamResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
        mel = _StreamLogMel()
        produced = 0
        target = None if duration_s is None else num_samples(duration_s)
        for chunk in chunks:
            out = resampler.push(chunk) if resampler is not None else chunk
            if target is not None:
                out = out[: target - produced]
            produced += out.size
            emit(mel.push(out))
        out = resampler.finish() if resampler is not None else np.zeros(0, np.float32)
        if target is not None:
            out = out[: target - produced]
            out = np.concatenate([out, np.zeros(max(0, target - produced - out.size), np.float32)])
        emit(mel.push(out, final=True))
        return mel.length
