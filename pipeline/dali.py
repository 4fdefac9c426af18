"""The DALI path: decode, crop, resize and flip the video views in a DALI pipeline (the only module importing DALI).

The shard reader (`shards.py`, in torch DataLoader workers) selects, splits and skips samples and draws every view
parameter; this module feeds the encoded `video.mp4` bytes and those parameters through `fn.external_source` into
`fn.decoders.video` with a per-sample start frame, stride and sequence length (`mixed` backend: NVDEC on the GPU;
`cpu` backend: libavcodec, VP9/VP8/MJPEG only, which is why shards are VP9), cuts the local views out of the
decoded global clip with `fn.slice`, and crops each view with `fn.resize` on a per-sample pixel ROI (antialiased
bilinear) and `fn.flip`. Outputs leave through DALI's PyTorch iterator; the audio views and labels, computed by the
reader, travel beside the pipeline in a FIFO (DALI keeps batch order). Photometric augmentation then runs once on
the batch (`augment.augmented_batch`, as on the PyAV path): on the GPU on `mixed`, where `DataConfig.augment_device`
says on `cpu`.

DALI cannot skip a sample: a decode error stops the run. The error names the shard and key of the samples in
flight that PyAV cannot decode either, and the `xkd-shard verify` command that finds such samples ahead of time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from xkd.pipeline.augment import augmented_batch
from xkd.pipeline.batch import Batch
from xkd.pipeline.decode import DecodeError, decode_frames

# Per-sample arrays the reader prepares for the pipeline (see `video_feed`): the global view's, then each local
# view's (start offset in decoded frames, ROI start, ROI end, flip).
GLOBAL_FEED = ("encoded", "start", "stride", "roi_start", "roi_end", "flip")
LOCAL_FEED = ("offset", "roi_start", "roi_end", "flip")


def video_feed(data: bytes, view: dict[str, object]) -> list[np.ndarray]:
    """The arrays one sample contributes to the pipeline's external source, in `GLOBAL_FEED` + L x `LOCAL_FEED`
    order. Built in the reader workers, so the main process only hands them to DALI."""
    box = np.asarray(view["video_box"], dtype=np.float32)
    arrays = [
        np.frombuffer(data, dtype=np.uint8),
        np.array(view["video_start"], dtype=np.int32),
        np.array(view["video_stride"], dtype=np.int32),
        box[:2].copy(),
        box[2:].copy(),
        np.array(view["video_flip"], dtype=np.int32),
    ]
    if "video_local_offset" in view:
        for offset, local_box, flip in zip(
            view["video_local_offset"], view["video_local_box"], view["video_local_flip"]
        ):
            local_box = np.asarray(local_box, dtype=np.float32)
            arrays += [
                np.array([offset], dtype=np.int32),
                local_box[:2].copy(),
                local_box[2:].copy(),
                np.array(flip, dtype=np.int32),
            ]
    return arrays


def _crop(video, roi_start, roi_end, flip, size: int):
    """Crop a pixel ROI of every frame of (F, H, W, C) clips, resize it to size x size, flip per sample."""
    out = fn.resize(
        video,
        size=[size, size],
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    return fn.flip(out, horizontal=flip)


@pipeline_def
def _video_graph(
    source, device: str, frames: int, size: int, local_frames: int, local_size: int, local_views: int
):
    feed = fn.external_source(
        source=source, num_outputs=len(GLOBAL_FEED) + len(LOCAL_FEED) * local_views, batch=True
    )
    encoded, start, stride, roi_start, roi_end, flip = feed[: len(GLOBAL_FEED)]
    # Frames past the end of a short clip repeat the last one (the reader only lets short clips through when
    # asked to pad, e.g. in evaluation).
    clip = fn.decoders.video(
        encoded, device=device, start_frame=start, sequence_length=frames, stride=stride, pad_mode="edge"
    )  # (F, H, W, C) uint8 per sample
    outputs = [_crop(clip, roi_start, roi_end, flip, size)]
    for view in range(local_views):
        offset, local_start, local_end, local_flip = feed[len(GLOBAL_FEED) + len(LOCAL_FEED) * view :][
            : len(LOCAL_FEED)
        ]
        local_clip = fn.slice(clip, start=offset, shape=[local_frames], axes=[0])
        outputs.append(_crop(local_clip, local_start, local_end, local_flip, local_size))
    return tuple(outputs)


class _Feeder:
    """The external source: pulls the reader's next batch, hands DALI its video arrays and keeps the rest."""

    def __init__(self, batches: Iterator[dict[str, object]]):
        self.batches = batches
        self.in_flight: deque[dict[str, object]] = deque()
        self.reader_error: Exception | None = None

    def __call__(self) -> list[list[np.ndarray]]:
        try:
            batch = next(self.batches)  # StopIteration ends the DALI iterator
        except StopIteration:
            raise
        except Exception as err:  # DALI re-raises it wrapped; keep the reader's own error for the user
            self.reader_error = err
            raise
        columns = [list(column) for column in zip(*batch.pop("video_feed"))]
        encoded, start, stride = columns[:3]
        # What a decoding failure report needs: shard, key and the window of every sample of the batch.
        batch["video_check"] = [
            (*names, *window) for names, *window in zip(batch["video_check"], encoded, start, stride)
        ]
        self.in_flight.append(batch)
        return columns


class DaliBatches:
    """Iterator of `Batch` from an iterator of reader batches (dicts with `video_feed` and the Batch side fields).

    Args:
        batches: the reader's batches (see `loader.py`).
        device: `mixed` (GPU decode, outputs on `augment_device`) or `cpu`.
        max_batch: the largest batch the reader yields (the last one of an evaluation pass may be smaller).
        frames, size, local_frames, local_size, local_views: view geometry.
        threads: DALI worker threads.
        augment_device: where the views are augmented and normalised; on `mixed`, the CUDA device that decodes.
        blur_kernel: Gaussian-blur kernel of the photometric augmentation.
    """

    def __init__(
        self,
        batches: Iterator[dict[str, object]],
        device: str,
        max_batch: int,
        frames: int,
        size: int,
        local_frames: int,
        local_size: int,
        local_views: int,
        threads: int,
        augment_device: torch.device,
        blur_kernel: int,
    ):
        self.feeder = _Feeder(batches)
        self.local_views = local_views
        self.augment_device = augment_device
        self.blur_kernel = blur_kernel
        pipe = _video_graph(
            source=self.feeder,
            device=device,
            frames=frames,
            size=size,
            local_frames=local_frames,
            local_size=local_size,
            local_views=local_views,
            batch_size=max_batch,
            num_threads=threads,
            # A CPU-only pipeline needs device_id=None (CPU_ONLY_DEVICE_ID fails without a driver).
            device_id=augment_device.index if device == "mixed" else None,
            prefetch_queue_depth=2,
        )
        self.names = ["video_global"] + [f"video_local_{i}" for i in range(local_views)]
        self.iterator = DALIGenericIterator(
            pipe,
            self.names,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
            prepare_first_batch=False,
        )

    def __iter__(self) -> DaliBatches:
        return self

    def __next__(self) -> Batch:
        try:
            outputs = next(self.iterator)[0]
        except StopIteration:
            raise
        except Exception as err:
            if self.feeder.reader_error is not None:
                raise self.feeder.reader_error from err
            raise RuntimeError(self._decode_failure(err)) from err
        side = self.feeder.in_flight.popleft()
        side.pop("video_check")
        return augmented_batch(
            side,
            outputs["video_global"],
            [outputs[name] for name in self.names[1:]],
            self.augment_device,
            self.blur_kernel,
        )

    def _decode_failure(self, err: RuntimeError) -> str:
        """Name the samples in flight that PyAV cannot decode either (DALI does not say which sample failed)."""
        suspects, bad = [], []
        for batch in self.feeder.in_flight:
            for shard, key, data, start, stride in batch["video_check"]:
                suspects.append(f"{shard}:{key}")
                try:
                    decode_frames(data, int(start), 1, int(stride))
                except DecodeError as decode_err:
                    bad.append(f"{key} in {shard} ({decode_err})")
        named = "; ".join(bad) if bad else f"one of the samples in flight: {', '.join(suspects[:64])}"
        return (
            f"DALI stopped on a decoding error: {named}. DALI cannot skip a sample: find and remove such samples with "
            "`xkd-shard verify <shards dir>` and re-shard them (CPU decoding needs VP9 shards; H.264 needs the "
            f"`mixed` backend or backend='pyav'). DALI said: {' '.join(str(err).split())[:400]}"
        )
