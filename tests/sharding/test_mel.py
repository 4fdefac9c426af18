"""The audio front end (`xkd.sharding.mel`) against an independent NumPy implementation of the Slaney mel
spectrogram, plus decoding, alignment and the streaming path."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from xkd.sharding import mel


def test_numpy_filterbank_is_an_independent_slaney_reference(sh) -> None:
    fb = sh.slaney_filterbank(16000, 1024, 80, 0.0, 8000.0)
    # Slaney area normalisation: each triangle integrates to ~1 over its width in Hz (hence small weights),
    # and centres are linear below 1 kHz.
    centres = sh.slaney_mel_to_hz(np.linspace(0.0, sh.slaney_hz_to_mel(8000.0), 82))[1:-1]
    assert np.allclose(np.diff(centres[:10]), centres[1] - centres[0])
    assert sh.slaney_hz_to_mel(np.array([1000.0]))[0] == pytest.approx(15.0)
    assert fb.shape == (80, 513) and fb.max() < 0.1


def test_log_mel_matches_numpy_slaney_implementation(sh) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000.0
    y = (
        0.3 * np.sin(2 * np.pi * 440.0 * t)
        + 0.05 * rng.standard_normal(t.size)
        + 0.2 * np.sin(2 * np.pi * 3100 * t)
    )
    got = mel.log_mel(torch.from_numpy(y.astype(np.float32)))
    assert got.shape == (80, 1 + y.size // 143) and got.dtype == torch.float32
    sh.assert_float16_close(got.to(torch.float16).numpy(), sh.numpy_log_mel(y.astype(np.float32)))


def test_four_seconds_give_448_frames_and_silence_is_the_floor() -> None:
    assert mel.mel_frames(mel.num_samples(4.0)) == 448
    assert mel.mel_frames(mel.num_samples(1.0)) == 112
    out = mel.log_mel(torch.zeros(64000))
    assert out.shape == (80, 448)
    assert torch.allclose(out, mel.silent_log_mel(448))
    assert pytest.approx(math.log(1.1920929e-07)) == mel.SILENCE


def test_log_mel_resamples_and_averages_channels(sh) -> None:
    t = torch.arange(44100) / 44100.0
    stereo = torch.stack([torch.sin(2 * math.pi * 500 * t), torch.zeros_like(t)])
    out = mel.log_mel(stereo, 44100)
    assert out.shape == (80, 1 + 16000 // 143)
    # The tone lands in the bin whose centre is nearest 500 Hz, at half amplitude (mono average).
    peak = int(out[:, 50].argmax())
    centres = sh.slaney_mel_to_hz(np.linspace(0.0, sh.slaney_hz_to_mel(8000.0), 82))[1:-1]
    assert abs(centres[peak] - 500.0) < 70.0
    with pytest.raises(ValueError, match="too short"):
        mel.log_mel(torch.zeros(300))


def test_decode_audio_cuts_the_segment_at_stream_time(media, sh, tmp_path) -> None:
    # delayed.mp4 has a beep at 1.5 s of stream time.
    y = mel.decode_audio(media["delayed"], 1.0, 1.0).numpy()
    assert y.shape == (16000,) and y.dtype == np.float32
    onset = int(np.argmax(np.abs(y) > 0.05))
    assert abs(onset - 8000) < 16000 * 0.01  # 0.5 s into the segment, within 10 ms
    # Past the end: zero padded to the exact length; file objects work like paths.
    with open(media["delayed"], "rb") as f:
        tail = mel.decode_audio(io.BytesIO(f.read()), 2.5, 2.0)
    assert tail.shape == (32000,) and float(tail[16000:].abs().max()) == 0.0
    with pytest.raises(mel.NoAudioStream):
        mel.decode_audio(media["silent"])


def test_streamed_log_mel_equals_the_in_memory_one(media, tmp_path, monkeypatch) -> None:
    # Small streaming blocks force several resampler and STFT blocks; the result must not change.
    monkeypatch.setattr(mel, "_STREAM_SECONDS", 0.3)
    for source, start, duration in [
        (media["wav"], 0.0, None),
        (media["av2"], 0.37, 1.5),
        (media["audio_only"], 0.2, None),
    ]:
        reference = mel.log_mel(mel.decode_audio(source, start, duration)).to(torch.float16).numpy()
        result = mel.write_log_mel(source, start, duration, tmp_path / "m.npy")
        stored = np.load(tmp_path / "m.npy")
        assert stored.dtype == np.float16 and stored.shape == reference.shape == (80, result.frames)
        # Different block boundaries change float32 rounding only: at most one float16 step.
        step = np.abs(reference.astype(np.float32)) * 2.0**-10 + 1e-3
        assert np.all(np.abs(stored.astype(np.float32) - reference.astype(np.float32)) <= step)
        assert result.count == stored.size
        assert result.total == pytest.approx(stored.astype(np.float64).sum())
        assert result.total_sq == pytest.approx(np.square(stored.astype(np.float64)).sum())
    assert not list(tmp_path.glob("*.spool"))
