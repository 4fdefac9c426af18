"""Tests for the built-in demo dataset generator (`xkd.sharding.demo`, issue 2 item 5).

Layout and streams are checked on the `--mini` set; the learnability properties (class recoverable from each
modality alone by a hand-made feature, nuisance not predictive, linear probes on raw pixels and on a random
3D convolution well below perfect) on a moderate set of 10 classes x 8 clips at 32 px, split 50/50 by clip.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xkd.sharding import demo

MODERATE = demo.DemoSpec(classes=10, clips_per_class=8, size=32)


@pytest.fixture(scope="session")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    demo.main(["--out", str(out), "--mini", "--workers", "1"])
    return out


@pytest.fixture(scope="session")
def moderate(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The moderate set decoded: frames (N, T, H, W, 3), audio (N, S), labels (N,), even clips train."""
    out = tmp_path_factory.mktemp("demo-moderate")
    demo.generate(out, MODERATE, workers=2)
    frames, audio, labels = [], [], []
    for label, name in enumerate(demo.class_names(MODERATE.classes)):
        for clip in range(MODERATE.clips_per_class):
            v, a, _ = demo.read_clip(out / "UCF-101" / demo.clip_path(name, clip, MODERATE))
            frames.append(v)
            audio.append(a[: MODERATE.num_samples])
            labels.append(label)
    n = len(labels)
    return {
        "frames": np.stack(frames),
        "audio": np.stack(audio),
        "labels": np.array(labels),
        "train": np.arange(n) % 2 == 0,
    }


def _probe(features: np.ndarray, data: dict[str, np.ndarray]) -> float:
    """Test accuracy of a standardised logistic regression fitted on the even clips."""
    train, y = data["train"], data["labels"]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(features[train], y[train])
    return float(clf.score(features[~train], y[~train]))


def _split_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == raw.count(b"\n"), f"{path} must use CRLF line ends"
    return raw.decode("ascii").split("\r\n")[:-1]


def test_mini_has_video_and_audio_streams_of_the_announced_duration(mini: Path) -> None:
    spec = demo.MINI
    files = sorted((mini / "UCF-101").glob("*/*.avi"))
    assert len(files) == spec.classes * spec.clips_per_class == 12
    for path in files:
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert video.codec_context.name == "mpeg4" and audio.codec_context.name in ("mp3", "mp3float")
            assert (video.width, video.height) == (spec.size, spec.size)
            assert (audio.rate, audio.channels) == (spec.sample_rate, 1)
            for stream in (video, audio):
                duration = float(stream.duration * stream.time_base)
                # MP3 rounds up to whole 36 ms frames plus the encoder delay.
                assert abs(duration - spec.clip_seconds) < 0.15, f"{path}: {stream.type} lasts {duration} s"
        frames, wave, rate = demo.read_clip(path)
        assert frames.shape == (spec.num_frames, spec.size, spec.size, 3)
        assert rate == spec.sample_rate and len(wave) >= spec.num_samples


def test_split_files_list_every_clip_exactly_once(mini: Path) -> None:
    lists = mini / "ucfTrainTestlist"
    names = demo.class_names(demo.MINI.classes)
    assert _split_lines(lists / "classInd.txt") == [f"{i + 1} {n}" for i, n in enumerate(names)]
    train = [line.split(" ") for line in _split_lines(lists / "trainlist01.txt")]
    test = _split_lines(lists / "testlist01.txt")
    on_disk = {p.relative_to(mini / "UCF-101").as_posix() for p in (mini / "UCF-101").glob("*/*.avi")}
    train_paths = [path for path, _ in train]
    assert len(set(train_paths)) == len(train_paths) and len(set(test)) == len(test)
    assert set(train_paths) | set(test) == on_disk and not set(train_paths) & set(test)
    for path, label in train:  # 1-based label of the folder, UCF-style file name
        cls = path.split("/")[0]
        assert names[int(label) - 1] == cls and path.startswith(f"{cls}/v_{cls}_g")
    # Split by group, as UCF101: no group has clips on both sides.
    group = lambda p: p.split("/")[0] + p.rsplit("_c", 1)[0][-3:]  # noqa: E731
    assert not {group(p) for p in train_paths} & {group(p) for p in test}
    assert len(test) == demo.MINI.classes  # one test group of one clip per class


def test_generation_is_deterministic_per_seed(mini: Path, tmp_path: Path) -> None:
    def digests(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    # A different worker count must not change a byte: every clip depends on (seed, class, clip) only.
    demo.generate(tmp_path / "again", demo.MINI, workers=2)
    assert digests(tmp_path / "again") == digests(mini)
    demo.generate(tmp_path / "other", demo.DemoSpec(classes=3, clips_per_class=4, seed=1), workers=1)
    other = digests(tmp_path / "other")
    assert all(other[k] != v for k, v in digests(mini).items() if k.endswith(".avi"))


def test_audio_onsets_coincide_with_the_video_events(mini: Path) -> None:
    spec = demo.MINI
    for label, name in enumerate(demo.class_names(spec.classes)):
        _, _, events = demo.render_clip(label, 0, spec)
        frames, wave, rate = demo.read_clip(mini / "UCF-101" / demo.clip_path(name, 0, spec))
        # Video: the object's jumps are the largest frame-to-frame changes, exactly on the event frames.
        change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(
            (1, 2, 3)
        )  # change[i]: frame i -> i+1
        at_event = np.isin(np.arange(1, spec.num_frames), events)
        assert change[at_event].min() > change[~at_event].max()
        # Audio: each tone burst starts within 15 ms of its frame's time, despite the MP3 codec delay (69 ms).
        n_fft, hop = 256, 32
        windows = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop] * np.hanning(n_fft)
        pitch = demo.PATTERNS[label // len(demo.RHYTHMS)][1]
        band = np.abs(np.fft.rfft(windows, axis=1))[:, round(pitch * n_fft / rate) + np.arange(-1, 2)].sum(1)
        above = band > 0.5 * band.max()
        onsets: list[float] = []
        for crossing in ((np.flatnonzero(above[1:] & ~above[:-1]) + 1) * hop + n_fft / 2) / rate:
            # A decaying burst in noise can dip under the threshold and back; events are >= 250 ms apart.
            if not onsets or crossing - onsets[-1] > 0.2:
                onsets.append(crossing)
        assert len(onsets) == len(events)
        np.testing.assert_allclose(onsets, events / spec.fps, atol=0.015)


def test_each_modality_alone_recovers_the_class(moderate: dict[str, np.ndarray]) -> None:
    video = np.stack([demo.video_cue(v, MODERATE.fps) for v in moderate["frames"]])
    audio = np.stack([demo.audio_cue(a, MODERATE.sample_rate) for a in moderate["audio"]])
    assert _probe(video, moderate) >= 0.75
    assert _probe(audio, moderate) >= 0.95
    # Audio needs no fitting at all: the pitch names the pattern and the event rate the rhythm.
    pitches = np.log2([p for _, p in demo.PATTERNS])
    pattern = np.abs(audio[:, :1] - pitches).argmin(1)
    rhythm = (audio[:, 1] > 2.0).astype(int)
    assert np.mean(pattern * len(demo.RHYTHMS) + rhythm == moderate["labels"]) >= 0.95


def test_nuisance_factors_do_not_predict_the_class(moderate: dict[str, np.ndarray]) -> None:
    frames = moderate["frames"].astype(np.float32) / 255
    wave = moderate["audio"]
    loudness = 10 * np.log10(np.mean(wave**2, axis=1))
    # Background noise floor: the quietest 10% of 20 ms windows, between the tone bursts.
    windows = wave[:, : wave.shape[1] // 320 * 320].reshape(len(wave), -1, 320)
    floor = 10 * np.log10(np.percentile(np.mean(windows**2, axis=2), 10, axis=1))
    nuisance = np.column_stack(
        [frames.mean((1, 2, 3)), frames.std((1, 2, 3)), frames.std(axis=(2, 3)).mean((1, 2)), loudness, floor]
    )
    chance = 1 / MODERATE.classes
    assert _probe(nuisance, moderate) <= chance + 0.2


def test_linear_probes_on_raw_pixels_and_a_random_3d_conv_stay_well_below_perfect(
    moderate: dict[str, np.ndarray],
) -> None:
    frames = torch.from_numpy(moderate["frames"]).permute(0, 4, 1, 2, 3).float() / 255  # (N, C, T, H, W)
    pixels = torch.nn.functional.avg_pool3d(frames, (2, 8, 8)).flatten(1).numpy()  # 16 x 4 x 4 x 3
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
    with torch.no_grad():
        random = torch.relu(conv((frames - 0.5) / 0.25)).mean((2, 3, 4)).numpy()
    assert _probe(pixels, moderate) <= 0.5
    assert _probe(random, moderate) <= 0.5


def test_cli_rejects_bad_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--classes", str(demo.MAX_CLASSES + 1)])
    assert "--classes" in capsys.readouterr().err
    # A folder with clips these parameters do not make is refused, never silently mixed.
    demo.generate(tmp_path, demo.DemoSpec(classes=2, clips_per_class=3), workers=1)
    with pytest.raises(SystemExit, match="delete the folder"):
        demo.main(["--out", str(tmp_path), "--classes", "2", "--clips-per-class", "2", "--workers", "1"])
