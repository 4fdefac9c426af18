"""One input file -> its samples: probe, re-encode the video, compute the log-mel, test-decode the result.

The offline half of XKD's input pipeline (paper section "Experiments": 8 fps video, 16 kHz log-mel audio;
`../shared/contracts.md` "Shards"): every source becomes constant-frame-rate video at `--fps` with its short side
at `--short-side` (aspect kept, even sizes, display rotation applied), VP9 in MP4 with a keyframe every 8 frames
(or H.264 with closed 8-frame GOPs), plus the log-mel of the soundtrack starting at the video's first frame. Each
clip written is decoded again before it is accepted, because DALI cannot skip a sample that fails to decode.

Time origin. A sample starts at T0 = (first video frame's timestamp in the source) + window start. ffmpeg is
given `-ss T0 - container start` (its input timeline starts at the container's start time), so output frame i
shows the source at T0 + i / fps; the log-mel is computed from source audio at [T0, T0 + frames / fps).

`encode_file` is the worker function: it never raises; whatever goes wrong becomes a failed `ManifestRow` with a
reason. Sources are opened as `file:<absolute path>` (PyAV and ffmpeg alike), so no file name is read as an
option or a URL protocol, and everything is streamed (ffmpeg reads the source, PyAV decodes audio packet by
packet, the log-mel goes to disk in blocks), so memory per worker does not grow with the source's length.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import ffmpeg
import imageio_ffmpeg

from xkd.sharding import mel
from xkd.sharding.layouts import Item
from xkd.sharding.manifest import ManifestRow, aggregate
from xkd.sharding.schema import JSON_EXT, MEL_EXT, VIDEO_EXT, SampleMeta, make_key

KEYFRAME_INTERVAL = 8
"""Frames between keyframes of the re-encoded video (random clip access decodes at most this many extra)."""
CODECS = ("vp9", "h264")
DEFAULT_CRF = {"vp9": 32, "h264": 23}
_LOG_CONTEXT = re.compile(r"\[[^\]]*@ 0x[0-9a-f]+\]\s*")


@dataclass(frozen=True)
class EncodeParams:
    """How samples are made; recorded in `dataset.json` and checked when a run resumes."""

    fps: float = 8.0
    short_side: int = 128
    codec: str = "vp9"
    crf: int | None = None
    max_seconds: float | None = None
    clip_seconds: float | None = None
    min_seconds: float = 1.0
    no_audio: str = "silence"
    audio_only: bool = False
    threads: int = 1
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"--codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"--short-side {self.short_side}: must be an even number of pixels >= 16")
        if not 0 < self.fps <= 120:
            raise ValueError(f"--fps {self.fps}: must be in (0, 120]")
        if self.min_seconds < 0.1:
            raise ValueError(
                f"--min-seconds {self.min_seconds}: must be at least 0.1 (the log-mel needs 1024 samples)"
            )
        if self.max_seconds is not None and self.max_seconds < self.min_seconds:
            raise ValueError(f"--max-seconds {self.max_seconds} is below --min-seconds {self.min_seconds}")
        if self.clip_seconds is not None and self.clip_seconds < self.min_seconds:
            raise ValueError(f"--clip-seconds {self.clip_seconds} is below --min-seconds {self.min_seconds}")
        if self.no_audio not in ("silence", "skip"):
            raise ValueError(f"--no-audio {self.no_audio!r}: choose silence or skip")

    def identity(self) -> dict[str, object]:
        """The parameters that change what a sample holds (a resumed run must use the same)."""
        return {
            "fps": self.fps,
            "short_side": self.short_side,
            "codec": self.codec,
            "crf": self.crf if self.crf is not None else DEFAULT_CRF[self.codec],
            "keyframe_interval": KEYFRAME_INTERVAL,
            "max_seconds": self.max_seconds,
            "clip_seconds": self.clip_seconds,
            "min_seconds": self.min_seconds,
            "no_audio": self.no_audio,
            "audio_only": self.audio_only,
        }


class SourceError(Exception):
    """A source cannot become a sample; `str()` is the manifest reason `<category>: <details>`."""

    def __init__(self, category: str, details: str) -> None:
        super().__init__(f"{category}: {details}")


@dataclass
class VideoInfo:
    index: int
    codec: str
    width: int
    height: int
    sar: Fraction
    rotation: int
    first_s: float
    """Timestamp of the first decoded frame (source timeline, seconds)."""
    fps: float
    vfr: bool
    end_s: float | None
    """Timestamp where the stream ends, if the container says."""


@dataclass
class AudioInfo:
    index: int
    codec: str
    sample_rate: int
    channels: int
    start_s: float
    end_s: float | None


@dataclass
class SourceInfo:
    format: str
    size: int
    start_s: float
    """Container start time: ffmpeg's input timeline starts here."""
    duration_s: float | None
    video: VideoInfo | None
    audio: AudioInfo | None


def _open_source(path: Path) -> av.container.InputContainer:
    return av.open("file:" + str(path), mode="r", metadata_errors="ignore")


def _ffmpeg_error(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split())[:200]


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: Path, want_video: bool) -> SourceInfo:
    """Open `path` with PyAV and describe its streams; decode the first video frame (rotation, true start).

    Raises:
        SourceError: empty, unreadable, or (when `want_video`) no decodable video stream.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SourceError("missing file", "the path does not exist (a broken link?)") from None
    if size == 0:
        raise SourceError("empty file", "0 bytes")
    try:
        container = _open_source(path)
    except av.error.FFmpegError as err:
        raise SourceError("not a media file", f"FFmpeg cannot read it ({_ffmpeg_error(err)})") from None
    with container:
        start = container.start_time / av.time_base if container.start_time is not None else 0.0
        duration = container.duration / av.time_base if container.duration else None
        audio = None
        if container.streams.audio:
            a = container.streams.audio[0]
            rate = a.codec_context.sample_rate or a.rate or 0
            a_start = _seconds(a.start_time, a.time_base)
            a_start = start if a_start is None else a_start
            a_end = _seconds(a.duration, a.time_base)
            audio = AudioInfo(
                index=a.index,
                codec=a.codec_context.name,
                sample_rate=int(rate),
                channels=a.codec_context.channels,
                start_s=a_start,
                end_s=None if a_end is None else a_start + a_end,
            )
        video = None
        streams = [
            s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
        ]
        if want_video and streams:
            video = _probe_video(container, streams[0], start, duration)
        return SourceInfo(
            format=container.format.name,
            size=size,
            start_s=start,
            duration_s=duration,
            video=video,
            audio=audio,
        )


def _probe_video(
    container: av.container.InputContainer, s: av.VideoStream, start: float, duration: float | None
):
    first = None
    packets = 0
    try:
        for packet in container.demux(s):
            packets += 1
            for frame in packet.decode():
                first = frame
                break
            if first is not None or packets > 500:
                break
    except av.error.FFmpegError as err:
        raise SourceError(
            "undecodable video", f"the first video frames do not decode ({_ffmpeg_error(err)})"
        ) from None
    if first is None:
        raise SourceError("undecodable video", "no frame decodes from the video stream")
    first_s = first.time if first.time is not None else (_seconds(s.start_time, s.time_base) or start)
    s_duration = _seconds(s.duration, s.time_base)
    s_start = _seconds(s.start_time, s.time_base)
    if s_duration is not None and s_start is not None:
        end = s_start + s_duration
    elif duration is not None:
        end = start + duration
    else:
        end = None
    avg = float(s.average_rate) if s.average_rate else 0.0
    guessed = float(s.guessed_rate) if s.guessed_rate else 0.0
    # The guessed (base) rate is the finest grid all timestamps sit on; a clearly lower average means frames are
    # missing from that grid, i.e. a variable frame rate.
    vfr = bool(avg and guessed and abs(avg - guessed) / guessed > 0.02)
    sar = s.sample_aspect_ratio or Fraction(1)
    return VideoInfo(
        index=s.index,
        codec=s.codec_context.name,
        width=first.width,
        height=first.height,
        sar=Fraction(sar) if sar > 0 else Fraction(1),
        rotation=int(round(first.rotation or 0)) % 360,
        first_s=float(first_s),
        fps=avg or guessed,
        vfr=vfr,
        end_s=end,
    )


def output_size(width: int, height: int, sar: Fraction, rotation: int, short_side: int) -> tuple[int, int]:
    """Display size after pixel aspect and rotation, scaled so the short side is `short_side`, both sides even."""
    display_w, display_h = width * float(sar), float(height)
    if rotation % 180 == 90:
        display_w, display_h = display_h, display_w
    scale = short_side / min(display_w, display_h)
    w = max(2, 2 * round(display_w * scale / 2))
    h = max(2, 2 * round(display_h * scale / 2))
    return (short_side, h) if display_w <= display_h else (w, short_side)


def plan_windows(available_s: float | None, params: EncodeParams) -> list[tuple[float, float | None]]:
    """(start, length) windows relative to the sample origin; length None means "to the end of the source"."""
    limit = params.max_seconds
    if available_s is not None:
        limit = available_s if limit is None else min(limit, available_s)
    if params.clip_seconds is None or limit is None:
        return [(0.0, limit)]
    windows = []
    start = 0.0
    while start + params.min_seconds <= limit + 1e-9:
        windows.append((start, round(min(params.clip_seconds, limit - start), 6)))
        start += params.clip_seconds
    return windows or [(0.0, limit)]


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def _codec_args(params: EncodeParams) -> dict[str, object]:
    crf = params.crf if params.crf is not None else DEFAULT_CRF[params.codec]
    common = {
        "g": KEYFRAME_INTERVAL,
        "keyint_min": KEYFRAME_INTERVAL,
        "pix_fmt": "yuv420p",
        "threads": params.threads,
    }
    if params.codec == "vp9":
        # `good` at cpu-used 5 is within a few percent of `realtime` speed at these sizes, with 30% smaller files.
        return {
            "c:v": "libvpx-vp9",
            "deadline": "good",
            "cpu-used": 5,
            "crf": crf,
            "b:v": 0,
            "row-mt": 1,
            **common,
        }
    # Closed GOPs without B-frames: every 8th frame is an IDR frame a clip can start from.
    return {"c:v": "libx264", "preset": "veryfast", "crf": crf, "sc_threshold": 0, "bf": 0, **common}


def transcode_command(
    source: Path,
    out: Path,
    stream_index: int,
    seek_s: float,
    length_s: float | None,
    size: tuple[int, int],
    upscale: bool,
    params: EncodeParams,
) -> list[str]:
    """The ffmpeg command line (built with ffmpeg-python) that writes one sample's video."""
    inputs: dict[str, object] = {"ss": f"{max(0.0, seek_s):.6f}", "threads": params.threads}
    if length_s is not None:
        inputs["t"] = f"{length_s:.6f}"
    # fps first (fewer frames to scale); start_time=0 pins output frame 0 to the seek point; area averaging
    # when shrinking (anti-aliased), bicubic when enlarging.
    vf = (
        f"fps=fps={params.fps}:start_time=0,scale={size[0]}:{size[1]}:flags={'bicubic' if upscale else 'area'},"
        "setsar=1"
    )
    outputs = {
        "map": f"0:{stream_index}",
        "vf": vf,
        "an": None,
        "sn": None,
        "dn": None,
        "map_metadata": -1,
        "map_chapters": -1,
        # Bit-exact muxing (no encoder string, no creation time): reruns write identical bytes.
        "fflags": "+bitexact",
        "flags:v": "+bitexact",
        "movflags": "+faststart",
        "f": "mp4",
        "filter_threads": params.threads,
        **_codec_args(params),
    }
    stream = ffmpeg.input("file:" + str(source), **inputs).output("file:" + str(out), **outputs)
    # -timelimit (CPU seconds) also stops an ffmpeg whose worker was killed and can no longer time it out.
    limit = str(int(params.timeout_s) + 1)
    stream = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-timelimit", limit)
    stream = stream.overwrite_output()
    return stream.compile(cmd=ffmpeg_exe())


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (a worker of a `kill -9`ed run)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_ffmpeg(cmd: list[str], timeout_s: float) -> str:
    """Run ffmpeg; return its error log (may be non-empty on success). Raises SourceError on failure.

    A blocking wait with a kill timer, not `subprocess.run(timeout=...)`, which polls with sleeps of up to 50 ms
    (10% of the time of a short clip). No `preexec_fn` either: it forces a full fork of the worker (70 ms with
    torch loaded); ffmpeg's own `-timelimit` bounds a child that outlives a killed worker instead.
    """
    expired = threading.Event()
    with tempfile.TemporaryFile() as log:
        # Its own session: a Ctrl-C in the terminal goes to xkd-shard (which stops cleanly), not to ffmpeg,
        # whose early exit would otherwise be recorded as a failed file.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )

        def kill() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        # A daemon started inside the try: a Ctrl-C landing in start() must not leave a timer that keeps the
        # interrupted run alive until it fires (--timeout-s, 30 min by default).
        timer.daemon = True
        try:
            timer.start()
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        log.seek(0)
        text = log.read(4096).decode("utf-8", "replace")
    if expired.is_set():
        raise SourceError("ffmpeg timed out", f"no result after {timeout_s:.0f} s (--timeout-s)")
    if returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-2:]
        raise SourceError("ffmpeg failed", f"exit {returncode}: {' | '.join(last)[:300]}")
    return text


@dataclass
class VideoCheck:
    """What decoding a re-encoded clip found."""

    frames: int
    width: int
    height: int
    fps: float
    max_gop: int
    """Longest run of frames from one keyframe to the next."""


def check_video(source: str | os.PathLike | object) -> VideoCheck:
    """Decode every frame of a clip (path or binary file object); raise SourceError if it does not decode,
    changes size, or is not at a constant frame rate."""
    target = (
        "file:" + os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    )
    frames, gop, max_gop = 0, 0, 0
    size = None
    times = []
    try:
        with av.open(target, mode="r") as container:
            s = container.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else 0.0
            for packet in container.demux(s):
                if packet.size:
                    gop = 1 if packet.is_keyframe else gop + 1
                    max_gop = max(max_gop, gop)
                for frame in packet.decode():
                    frames += 1
                    if size is None:
                        size = (frame.width, frame.height)
                    elif size != (frame.width, frame.height):
                        raise SourceError(
                            "test decode failed", f"frame {frames} is {frame.width}x{frame.height}"
                        )
                    if frame.time is not None:
                        times.append(frame.time)
    except av.error.FFmpegError as err:
        raise SourceError("test decode failed", _ffmpeg_error(err)) from None
    except IndexError:
        raise SourceError("test decode failed", "the clip has no video stream") from None
    if frames == 0 or size is None:
        raise SourceError("test decode failed", "no frame decodes")
    if len(times) > 1 and fps:
        steps = [b - a for a, b in zip(times, times[1:])]
        if max(abs(step - 1 / fps) for step in steps) > 0.25 / fps:
            raise SourceError("test decode failed", "frame timestamps are not at a constant rate")
    return VideoCheck(frames=frames, width=size[0], height=size[1], fps=fps, max_gop=max_gop)


@dataclass
class SampleFiles:
    """One sample ready for a shard: its json and the files of its other members."""

    key: str
    meta: SampleMeta
    video: Path | None
    mel: Path
    mel_stats: mel.MelResult | None
    """Statistics of the stored log-mel; None for silence (kept out of the dataset statistics)."""

    def members(self) -> list[tuple[str, bytes | Path]]:
        members: list[tuple[str, bytes | Path]] = [(JSON_EXT, self.meta.to_json()), (MEL_EXT, self.mel)]
        if self.video is not None:
            members.append((VIDEO_EXT, self.video))
        return members

    def discard(self) -> None:
        for path in (self.video, self.mel):
            if path is not None:
                path.unlink(missing_ok=True)


@dataclass
class Task:
    """One input file for a worker."""

    item: Item
    dataset: str
    params: EncodeParams
    work_dir: Path
    skip_keys: frozenset[str] = frozenset()
    """Window samples of this file already in finished shards (a resumed run): not made again."""


@dataclass
class FileResult:
    row: ManifestRow
    samples: list[SampleFiles] = field(default_factory=list)


def encode_file(task: Task) -> FileResult:
    """Make the samples of one input file. Never raises: failures come back as a failed row with a reason."""
    started = time.perf_counter()
    item = task.item
    row = new_row(item, task.dataset)
    samples: list[SampleFiles] = []
    if item.error is not None:
        row.reason = item.error
        return FileResult(row=row)
    try:
        notes = list(item.notes)
        samples = _encode(task, row, notes)
        aggregate(row, [s.meta for s in samples])
        row.status = "ok"
        row.reason = "; ".join(notes)
    except SourceError as err:
        for sample in samples:
            sample.discard()
        samples = []
        row.status, row.reason = "failed", str(err)
    except Exception as err:  # noqa: BLE001 (a worker must turn any bug into a row, not kill the run)
        for sample in samples:
            sample.discard()
        samples = []
        where = traceback.extract_tb(err.__traceback__)[-1]
        row.status = "failed"
        row.reason = (
            f"internal error: {type(err).__name__}: {err} (at {Path(where.filename).name}:{where.lineno})"
        )
    row.elapsed_s = round(time.perf_counter() - started, 3)
    return FileResult(row=row, samples=samples)


def new_row(item: Item, dataset: str, reason: str = "") -> ManifestRow:
    """A file's manifest row with what the listing knows (status `failed` until samples are made)."""
    return ManifestRow(
        source=item.source,
        key=make_key(dataset, item.source),
        dataset=dataset,
        reason=reason,
        split=item.split,
        folds=item.folds,
        label=item.label,
        label_name=item.label_name,
    )


def _encode(task: Task, row: ManifestRow, notes: list[str]) -> list[SampleFiles]:
    params, item = task.params, task.item
    assert item.path is not None
    with contextlib.suppress(OSError):
        row.source_bytes = item.path.stat().st_size
    info = probe(item.path, want_video=not params.audio_only)
    row.source_duration_s = round(info.duration_s or 0.0, 6)
    if info.audio is not None:
        row.source_audio_codec = info.audio.codec
        row.source_sample_rate = info.audio.sample_rate
    if info.audio is None and params.no_audio == "skip":
        raise SourceError("skipped: no audio stream", "--no-audio skip leaves out sources without sound")
    if params.audio_only:
        if info.audio is None:
            raise SourceError(
                "no audio stream", f"audio-only dataset but the {info.format} file has no audio"
            )
        origin = info.audio.start_s
        end = info.audio.end_s if info.audio.end_s is not None else _container_end(info)
    else:
        if info.video is None:
            has = "audio only" if info.audio is not None else "no streams FFmpeg can use"
            raise SourceError("no video stream", f"the {info.format} file has {has}")
        v = info.video
        row.source_video_codec, row.source_width, row.source_height = v.codec, v.width, v.height
        row.source_fps, row.rotation = round(v.fps, 4), v.rotation
        origin = v.first_s
        end = v.end_s
        if v.vfr:
            notes.append(f"variable frame rate: converted to constant {params.fps:g} fps")
        if v.rotation:
            notes.append(f"rotated: display rotation {v.rotation} applied")
        if v.width % 2 or v.height % 2:
            notes.append(f"odd size: {v.width}x{v.height} scaled to even")
        if info.audio is None:
            notes.append("no audio stream: silent log-mel, has_audio false")
    available = None if end is None else end - origin
    if available is not None and available < params.min_seconds:
        raise SourceError("too short", f"{available:.2f} s < --min-seconds {params.min_seconds:g}")
    windows = plan_windows(available, params)
    windowed = params.clip_seconds is not None
    source_key = make_key(task.dataset, item.source)
    samples: list[SampleFiles] = []
    for index, (offset, length) in enumerate(windows):
        key = make_key(task.dataset, f"{item.source}#{index}") if windowed else source_key
        if key in task.skip_keys:
            continue
        try:
            sample = _encode_window(
                task, info, key, origin + offset, length, source_key if windowed else None, notes
            )
        except SourceError as err:
            # A later window that comes out empty or too short is the end of a truncated source.
            if index > 0 and str(err).startswith(("too short", "test decode failed: no frame")):
                notes.append(f"truncated: only {index} of {len(windows)} windows decode")
                break
            raise
        samples.append(sample)
    if available is not None and not windowed and params.max_seconds is None and samples:
        covered = samples[0].meta.duration_s
        if covered < available - max(1.0, 0.1 * available):
            notes.append(f"truncated: the container announces {available:.1f} s but {covered:.1f} s decode")
    return samples


def _container_end(info: SourceInfo) -> float | None:
    return None if info.duration_s is None else info.start_s + info.duration_s


def _encode_window(
    task: Task,
    info: SourceInfo,
    key: str,
    start_s: float,
    length_s: float | None,
    source_key: str | None,
    notes: list[str],
) -> SampleFiles:
    params, item = task.params, task.item
    assert item.path is not None
    video_path = task.work_dir / f"{key}.{VIDEO_EXT}"
    mel_path = task.work_dir / f"{key}.{MEL_EXT}"
    fps = num_frames = width = height = 0
    try:
        if params.audio_only:
            duration = length_s
        else:
            v = info.video
            assert v is not None
            size = output_size(v.width, v.height, v.sar, v.rotation, params.short_side)
            upscale = min(v.width, v.height) < params.short_side
            cmd = transcode_command(
                item.path, video_path, v.index, start_s - info.start_s, length_s, size, upscale, params
            )
            log = run_ffmpeg(cmd, params.timeout_s)
            check = check_video(video_path)
            if (check.width, check.height) != size:
                raise SourceError(
                    "test decode failed", f"clip is {check.width}x{check.height}, expected {size}"
                )
            if check.max_gop > KEYFRAME_INTERVAL:
                raise SourceError("test decode failed", f"keyframes {check.max_gop} frames apart")
            fps, num_frames, width, height = params.fps, check.frames, check.width, check.height
            duration = num_frames / params.fps
            if duration < params.min_seconds:
                raise SourceError(
                    "too short", f"{duration:.2f} s of video decode < --min-seconds {params.min_seconds:g}"
                )
            if log.strip():
                # ffmpeg prefixes lines with "[context @ 0x...]": drop the address so reruns write the same row.
                first = _LOG_CONTEXT.sub("", log.strip().splitlines()[0])
                notes.append(f"decoder errors: {first[:160]}")
        has_audio = info.audio is not None
        try:
            result = mel.write_log_mel(item.path if has_audio else None, start_s, duration, mel_path)
        except mel.NoAudioStream:
            has_audio, result = False, mel.write_log_mel(None, start_s, duration, mel_path)
        except (av.error.FFmpegError, ValueError) as err:
            raise SourceError("audio decode failed", _ffmpeg_error(err)) from None
        if params.audio_only:
            duration = result.samples / mel.SAMPLE_RATE
            if duration < params.min_seconds:
                raise SourceError(
                    "too short", f"{duration:.2f} s of audio < --min-seconds {params.min_seconds:g}"
                )
        assert duration is not None
        meta = SampleMeta(
            key=key,
            dataset=task.dataset,
            source=item.source,
            split=item.split,
            label=item.label,
            label_name=item.label_name,
            duration_s=round(duration, 6),
            fps=float(fps),
            num_frames=num_frames,
            mel_frames=result.frames,
            has_audio=has_audio,
            folds=item.folds,
            source_key=source_key,
            width=width,
            height=height,
            extra=dict(item.extra),
        )
        return SampleFiles(
            key=key,
            meta=meta,
            video=None if params.audio_only else video_path,
            mel=mel_path,
            mel_stats=result if has_audio else None,
        )
    except BaseException:
        video_path.unlink(missing_ok=True)
        mel_path.unlink(missing_ok=True)
        raise
