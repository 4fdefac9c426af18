"""`DataConfig`: every knob of the data pipeline, with the XKD paper's values as defaults.

Geometry follows the paper's views (`../shared/xkd-method.md` 1.1, 2.1): a synchronous 4 s global view (32 frames
at 8 fps, 112x112; 80x448 log-mel) and 1 s local views (8 frames at 96x96; 80x112). Augmentation defaults are
those of sections 3.2 (video) and 3.3 (audio); evaluation geometry is section 5.1 (resize 128, centre crop 112).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "dali", "pyav")
DALI_DEVICES = ("auto", "mixed", "cpu")
AUGMENT_DEVICES = ("auto", "cpu", "cuda")
SHORT_CLIPS = ("skip", "pad")


@dataclass
class DataConfig:
    shards: str = "data/demo/shards"
    """Directory written by `xkd-shard`: `<split>-*.tar` (or `all-*.tar` for fold datasets) and `dataset.json`."""
    split: str = "train"
    """Split the training loader reads (`train`, `val`, `test`); evaluation loaders take the split as an argument."""
    fold: int | None = None
    """Fold of UCF101/HMDB51/ESC-50 style datasets (`all-*.tar` shards); None means fold 1 there, unused elsewhere."""
    classes: list[str] | None = None
    """Class-name subset to keep (e.g. the 32 Kinetics-Sound classes); labels are then renumbered to positions in
    this list. None keeps every class with its `dataset.json` id."""
    require_audio: bool | None = None
    """Drop samples whose source had no audio (`has_audio` false). None: True for training (pretraining needs both
    modalities), False for evaluation (silent sources still count for video-only probes)."""
    with_video: bool | None = None
    """Produce the video views. None: whenever the samples have a video member (audio-only data such as ESC-50
    leave the video fields of `Batch` None)."""
    with_audio: bool = True
    """Produce the audio views; False leaves the audio fields of `Batch` None (e.g. a video-only probe)."""

    batch_size: int = 32
    """Samples per batch on each rank. Evaluation batches hold `batch_size` samples x clips x crops rows."""
    num_workers: int = 2
    """Shard-reader worker processes per rank (they also decode video on the `pyav` backend); 0 reads in-process."""
    backend: str = "auto"
    """`dali`, `pyav` or `auto`: DALI if `nvidia.dali` imports (decoder `mixed` when CUDA is available, else
    `cpu`), otherwise the portable PyAV path."""
    dali_device: str = "auto"
    """DALI decoder backend: `mixed` (GPU, NVDEC), `cpu` (libavcodec; VP9/VP8/MJPEG only) or `auto` (mixed if CUDA
    is available)."""
    dali_threads: int = 4
    """Threads of the DALI pipeline (decoding and resizing on the CPU backend; host-side work on `mixed`)."""
    device_id: int | None = None
    """CUDA device of the `mixed` DALI path and of `augment_device='cuda'`; None uses `torch.cuda.current_device()`
    (set per rank by the trainer)."""
    augment_device: str = "auto"
    """Where the CPU-decoding paths (`pyav`, DALI `cpu`) run the photometric augmentation and ImageNet normalisation:
    `cpu` (inside the PyAV reader workers, beside the decoding; in the main process on DALI `cpu`), `cuda` (on the
    GPU `device_id`, after copying the uint8 views there: a quarter of the float batch's bytes, and no CPU time) or
    `auto` (`cuda` when CUDA is available). DALI `mixed` always runs them on its GPU."""
    shuffle_buffer: int = 1000
    """Samples held per reader worker for shuffling in training; each holds its encoded bytes (~0.1-0.5 MB)."""
    max_consecutive_skips: int = 1000
    """Raise instead of skipping when this many samples in a row are faulty or a resampled training stream finds
    no usable sample in this many shards: the data (or the selection) is broken, not a few samples."""
    short_clips: str = "skip"
    """Training samples shorter than the global window: `skip` (counted warning) or `pad` (repeat the last video
    frame, pad the mel with silence). Evaluation always pads, so every selected sample is scored."""

    video_fps: float = 8.0
    """Frame rate of the views; the shards' rate must be an integer multiple (decoded with that stride)."""
    video_frames: int = 32
    """Frames of the global video view (4 s at 8 fps)."""
    video_size: int = 112
    """Height and width of the global video view."""
    video_local_frames: int = 8
    """Frames of a local video view: consecutive frames taken from the global clip."""
    video_local_size: int = 96
    """Height and width of a local video view."""
    video_local_views: int = 1
    """Local video views per sample (1 in XKD, 3 in XKD-MAS/MATS); 0 disables them."""
    audio_mel_bins: int = 80
    """Mel bins; must match the shards."""
    audio_mel_frames: int = 448
    """Mel frames of the global audio view (4 s at 16 kHz, hop 143), cut to the video window."""
    audio_local_mel_frames: int = 112
    """Mel frames of a local audio view (1 s), taken from the global window."""
    audio_local_views: int = 1
    """Local audio views per sample; 0 disables them."""

    augment: bool = True
    """Random photometric video augmentation and volume jitter in training. False keeps only the geometric views
    (random windows, crops, flips) and normalisation, e.g. for benchmarks or feature banks."""
    video_global_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range of the global view."""
    video_local_scale: tuple[float, float] = (0.08, 0.4)
    """RandomResizedCrop area range of the local views."""
    video_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range (both views)."""
    video_flip_p: float = 0.5
    """Horizontal flip probability (both views)."""
    video_jitter_p: float = 1.0
    """Colour-jitter probability; the paper applies it always, with the same factors on every frame of a view."""
    video_brightness: float = 0.4
    """Colour jitter: brightness factor drawn from [1 - b, 1 + b]."""
    video_contrast: float = 0.4
    """Colour jitter: contrast factor drawn from [1 - c, 1 + c]."""
    video_saturation: float = 0.4
    """Colour jitter: saturation factor drawn from [1 - s, 1 + s]."""
    video_hue: float = 0.2
    """Colour jitter: hue shift drawn from [-h, h] (fraction of the colour circle)."""
    video_grayscale_p: float = 0.0
    """Grayscale probability of the global view (none in the paper)."""
    video_local_grayscale_p: float = 0.2
    """Grayscale probability of the local views."""
    video_blur_p: float = 0.0
    """Gaussian-blur probability of the global view (none in the paper)."""
    video_local_blur_p: float = 0.5
    """Gaussian-blur probability of the local views."""
    video_blur_kernel: int = 9
    """Gaussian-blur kernel size (odd)."""
    video_blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian-blur sigma range in pixels."""
    video_eval_resize: int = 128
    """Evaluation: the short side is scaled to this before the centre crop of `video_size` (the paper's 128 -> 112)."""

    mel_mean: float = -5.3688107
    """Log-mel normalisation mean (the paper's Kinetics statistic, used for every dataset by default)."""
    mel_std: float = 4.410007
    """Log-mel normalisation standard deviation (Kinetics)."""
    mel_stats_from_dataset: bool = False
    """Use the shards' own mel statistics (from `dataset.json`) instead of `mel_mean`/`mel_std`."""
    audio_global_gain: tuple[float, float] = (0.9, 1.1)
    """Volume-jitter gain range of the global audio view (added as 2 ln g to the log-mel)."""
    audio_local_gain: tuple[float, float] = (0.8, 1.2)
    """Volume-jitter gain range of the local audio views."""
    audio_local_canvas: float = 1.5
    """BYOL-A random resize crop: the local mel is centred on a canvas this many times longer (time axis)."""
    audio_local_freq_scale: tuple[float, float] = (0.6, 1.5)
    """BYOL-A random resize crop: crop height range as a fraction of the mel bins."""
    audio_local_time_scale: tuple[float, float] = (0.6, 1.5)
    """BYOL-A random resize crop: crop width range as a fraction of the local view length."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DataConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.dali_device not in DALI_DEVICES:
            raise ValueError(f"DataConfig.dali_device={self.dali_device!r}: choose one of {DALI_DEVICES}")
        if self.augment_device not in AUGMENT_DEVICES:
            raise ValueError(
                f"DataConfig.augment_device={self.augment_device!r}: choose one of {AUGMENT_DEVICES}"
            )
        if self.short_clips not in SHORT_CLIPS:
            raise ValueError(f"DataConfig.short_clips={self.short_clips!r}: choose one of {SHORT_CLIPS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.dali_threads < 1:
            raise ValueError("DataConfig: batch_size and dali_threads must be >= 1 and num_workers >= 0")
        if not 0 < self.video_local_frames <= self.video_frames:
            raise ValueError(
                f"DataConfig.video_local_frames={self.video_local_frames} must be in 1..video_frames={self.video_frames}"
            )
        if not 0 < self.audio_local_mel_frames <= self.audio_mel_frames:
            raise ValueError(
                f"DataConfig.audio_local_mel_frames={self.audio_local_mel_frames} must be in "
                f"1..audio_mel_frames={self.audio_mel_frames}"
            )
        if self.video_blur_kernel % 2 == 0:
            raise ValueError(f"DataConfig.video_blur_kernel={self.video_blur_kernel} must be odd")
        if self.mel_std <= 0:
            raise ValueError(f"DataConfig.mel_std={self.mel_std} must be positive")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("DataConfig.classes lists a class twice")
        if self.video_local_views < 0 or self.audio_local_views < 0:
            raise ValueError("DataConfig: local view counts must be >= 0")

    @property
    def clip_seconds(self) -> float:
        """Length of the global window in seconds (video frames / fps)."""
        return self.video_frames / self.video_fps
