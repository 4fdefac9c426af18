"""One file -> its samples (`xkd.sharding.encode`): geometry, frame rate, keyframes, log-mel alignment and every
bad-input case of issue 3, each ending as a row with a clear reason instead of an exception."""

from __future__ import annotations

import shutil
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from xkd.sharding import mel
from xkd.sharding.encode import (
    EncodeParams,
    Task,
    check_video,
    encode_file,
    output_size,
    plan_windows,
    probe,
    run_ffmpeg,
)
from xkd.sharding.layouts import Item
from xkd.sharding.schema import make_key


def run(path: Path, tmp_path: Path, source: str | None = None, **params):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    item = Item(source=source or path.name, path=path, split="train", label=3, label_name="x")
    return encode_file(Task(item, "t", EncodeParams(**params), work))


def only_sample(result):
    assert result.row.status == "ok", result.row.reason
    assert len(result.samples) == 1
    return result.samples[0]


def test_output_size_keeps_aspect_with_even_sides() -> None:
    assert output_size(64, 48, Fraction(1), 0, 128) == (170, 128)
    assert output_size(64, 48, Fraction(1), 90, 128) == (128, 170)
    assert output_size(1280, 720, Fraction(1), 0, 128) == (228, 128)
    assert output_size(65, 49, Fraction(1), 0, 128) == (170, 128)
    assert output_size(720, 576, Fraction(16, 15), 0, 128) == (170, 128)  # anamorphic PAL 4:3
    assert output_size(100, 100, Fraction(1), 270, 256) == (256, 256)


def test_plan_windows() -> None:
    assert plan_windows(4.5, EncodeParams()) == [(0.0, 4.5)]
    assert plan_windows(4.5, EncodeParams(max_seconds=2.0)) == [(0.0, 2.0)]
    assert plan_windows(None, EncodeParams()) == [(0.0, None)]
    assert plan_windows(4.5, EncodeParams(clip_seconds=2.0)) == [(0.0, 2.0), (2.0, 2.0)]
    assert plan_windows(5.2, EncodeParams(clip_seconds=2.0)) == [(0.0, 2.0), (2.0, 2.0), (4.0, 1.2)]
    with pytest.raises(ValueError, match="--short-side"):
        EncodeParams(short_side=127)


def test_good_clip_geometry_rate_keyframes_and_mel(media, tmp_path, sh) -> None:
    sample = only_sample(run(media["av"], tmp_path))
    meta = sample.meta
    assert (meta.width, meta.height, meta.fps, meta.num_frames) == (170, 128, 8.0, 12)
    assert meta.duration_s == 1.5 and meta.mel_frames == mel.mel_frames(24000) == 168 and meta.has_audio
    assert meta.key == make_key("t", "av.mp4") and meta.label == 3 and meta.source_key is None
    check = check_video(sample.video)
    assert (check.frames, check.width, check.height, check.fps) == (12, 170, 128, 8.0)
    assert check.max_gop <= 8
    with av.open(str(sample.video)) as c:
        assert c.streams.video[0].codec_context.name == "vp9" and c.format.name.startswith("mov,mp4")
        assert not c.streams.audio
    stored = np.load(sample.mel)
    assert stored.dtype == np.float16 and stored.shape == (80, 168)
    # Same waveform (the segment the sample covers), independent NumPy Slaney mel: equal within float16.
    info = probe(media["av"], want_video=True)
    waveform = mel.decode_audio(media["av"], info.video.first_s, meta.duration_s).numpy()
    sh.assert_float16_close(stored, sh.numpy_log_mel(waveform))
    assert sample.mel_stats.count == stored.size


def test_big_buck_bunny_720p_six_channel(bigbuckbunny, tmp_path, sh) -> None:
    src = tmp_path / "bbb.mp4"
    shutil.copyfile(bigbuckbunny, src)
    result = run(src, tmp_path)
    sample = only_sample(result)
    meta = sample.meta
    assert (meta.width, meta.height) == (228, 128)
    assert result.row.source_width == 1280 and result.row.source_audio_codec == "aac"
    assert abs(meta.num_frames - 8 * result.row.source_duration_s) <= 1
    assert meta.mel_frames == mel.mel_frames(mel.num_samples(meta.num_frames / 8))
    check = check_video(sample.video)
    assert check.frames == meta.num_frames and check.max_gop <= 8
    first = probe(src, want_video=True).video.first_s
    waveform = mel.decode_audio(src, first, meta.duration_s).numpy()
    assert np.abs(waveform).max() > 0.01  # a real soundtrack, averaged over 6 channels
    sh.assert_float16_close(np.load(sample.mel), sh.numpy_log_mel(waveform))


def test_mel_is_aligned_to_the_first_video_frame(media, tmp_path) -> None:
    # delayed.mp4: video starts 0.5 s after the audio; flash and beep both at 1.5 s source time.
    sample = only_sample(run(media["delayed"], tmp_path))
    with av.open(str(sample.video)) as c:
        luma = [f.to_ndarray(format="gray").mean() for f in c.decode(video=0)]
    flash_s = int(np.argmax(np.array(luma) > 128)) / 8.0
    energy = np.load(sample.mel).astype(np.float32).max(axis=0)
    onset_s = (int(np.argmax(energy > -5.0)) * mel.HOP_LENGTH + mel.N_FFT // 2) / mel.SAMPLE_RATE
    assert abs(flash_s - 1.0) <= 1 / 8 + 0.03  # the flash is 1 s after the first video frame
    assert abs(onset_s - flash_s) <= 1 / 8, (onset_s, flash_s)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("empty", "empty file: 0 bytes"),
        ("text", "not a media file: FFmpeg cannot read it"),
        ("trunc_tail", "not a media file"),
        ("audio_only", "no video stream: the mov,mp4,m4a,3gp,3g2,mj2 file has audio only"),
        ("short", "too short: 0.40 s < --min-seconds 1"),
    ],
)
def test_bad_inputs_become_failed_rows(media, tmp_path, case, reason) -> None:
    result = run(media[case], tmp_path)
    assert result.row.status == "failed" and result.samples == []
    assert result.row.reason.startswith(reason), result.row.reason
    assert not list((tmp_path / "work").iterdir())  # nothing left behind


def test_missing_file_row(tmp_path) -> None:
    result = run(tmp_path / "gone.mp4", tmp_path)
    assert result.row.status == "failed" and result.row.reason.startswith("missing file")


@pytest.mark.parametrize(
    ("case", "size", "frames", "note"),
    [
        ("rotated", (128, 170), 12, "rotated: display rotation 90 applied"),
        ("odd", (170, 128), 12, "odd size: 65x49 scaled to even"),
        ("vfr", (170, 128), 16, "variable frame rate: converted to constant 8 fps"),
        ("trunc_head", (170, 128), None, "truncated"),
    ],
)
def test_awkward_sources_are_converted(media, tmp_path, case, size, frames, note) -> None:
    result = run(media[case], tmp_path)
    sample = only_sample(result)
    check = check_video(sample.video)
    assert (check.width, check.height) == size == (sample.meta.width, sample.meta.height)
    assert check.frames == sample.meta.num_frames and check.max_gop <= 8
    if frames is not None:
        assert sample.meta.num_frames == frames
    else:  # the decodable part of a truncated file, fewer frames than the container announces
        assert 8 <= sample.meta.num_frames < 36
    assert note in result.row.reason


def test_no_audio_silence_or_skip(media, tmp_path) -> None:
    sample = only_sample(run(media["silent"], tmp_path))
    assert not sample.meta.has_audio and sample.mel_stats is None
    assert np.all(np.load(sample.mel) == np.float16(mel.SILENCE))
    skipped = run(media["silent"], tmp_path, no_audio="skip")
    assert skipped.row.status == "failed" and skipped.row.reason.startswith("skipped: no audio stream")


def test_audio_only_sample(media, tmp_path) -> None:
    sample = only_sample(run(media["wav"], tmp_path, audio_only=True))
    assert sample.video is None and [m for m, _ in sample.members()] == ["json", "mel.npy"]
    assert (sample.meta.num_frames, sample.meta.fps, sample.meta.duration_s) == (0, 0.0, 2.0)
    assert sample.meta.mel_frames == np.load(sample.mel).shape[1] == 224


def test_windows_and_max_seconds(media, tmp_path) -> None:
    result = run(media["long"], tmp_path, clip_seconds=2.0)
    assert result.row.status == "ok" and result.row.samples == 2  # 4.5 s: 2 + 2, the 0.5 s tail is dropped
    keys = [s.key for s in result.samples]
    assert keys == [make_key("t", "long.mp4#0"), make_key("t", "long.mp4#1")]
    assert {s.meta.source_key for s in result.samples} == {make_key("t", "long.mp4")} == {result.row.key}
    assert [s.meta.num_frames for s in result.samples] == [16, 16]
    # The second window starts 2 s in: its mel is the segment [2, 4) s of the source.
    first = probe(media["long"], want_video=True).video.first_s
    expected = mel.log_mel(mel.decode_audio(media["long"], first + 2.0, 2.0)).numpy()
    assert np.allclose(np.load(result.samples[1].mel).astype(np.float32), expected, atol=0.02)
    capped = only_sample(run(media["long"], tmp_path, max_seconds=2.0))
    assert capped.meta.num_frames == 16 and capped.meta.mel_frames == mel.mel_frames(32000)


def test_h264_has_closed_gops_of_8_frames(media, tmp_path) -> None:
    sample = only_sample(run(media["av2"], tmp_path, codec="h264"))
    with av.open(str(sample.video)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        keys = [i for i, p in enumerate(c.demux(stream)) if p.size and p.is_keyframe]
    with av.open(str(sample.video)) as c:
        types = {int(f.pict_type) for f in c.decode(video=0)}
    assert keys == list(range(0, sample.meta.num_frames, 8))
    assert int(PictureType.B) not in types


def test_file_names_are_never_options_or_protocols(media, tmp_path) -> None:
    name = "-i a:b !&()[]@#;,'\" é.mp4"
    src = tmp_path / name
    shutil.copyfile(media["av"], src)
    sample = only_sample(run(src, tmp_path, source=name))
    assert sample.meta.source == name and sample.meta.num_frames == 12


def test_ctrl_c_while_the_ffmpeg_timer_starts_leaves_no_thread_that_outlives_the_run(monkeypatch) -> None:
    # The interrupted run must be able to exit: no non-daemon timer left waiting for --timeout-s.
    start = threading.Timer.start

    def interrupted(self: threading.Timer) -> None:
        start(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Timer, "start", interrupted)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(KeyboardInterrupt):
        run_ffmpeg(sleeper, timeout_s=600)
    assert not [
        t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive() and not t.daemon
    ]
