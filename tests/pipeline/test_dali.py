"""The DALI path against the portable PyAV path on the same shards: same samples, windows and augmentations,
same shapes and dtypes, close pixels; decode errors name the sample; `mixed` (GPU) against `cpu`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from xkd.pipeline import Batch, make_eval_loader, make_train_loader
from xkd.pipeline.decode import crop_resize, decode_frames

pytest.importorskip("nvidia.dali", reason="DALI is the optional [dali] extra")


def assert_same_batches(a: list[Batch], b: list[Batch], mean_tol: float, max_tol: float) -> None:
    """Same samples, windows and audio; video equal within the decoders' and resizers' tolerance (normalised
    units: 1 grey level is about 0.017)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.key == y.key
        for name in ("label", "start_s", "clip_index", "audio_global", "audio_local"):
            vx, vy = getattr(x, name), getattr(y, name)
            assert (vx is None) == (vy is None), name
            if vx is not None:
                assert vx.dtype == vy.dtype and torch.equal(vx, vy.to(vx.device)), name
        for name in ("video_global", "video_local"):
            vx, vy = getattr(x, name), getattr(y, name)
            assert (vx is None) == (vy is None), name
            if vx is None:
                continue
            assert vx.shape == vy.shape and vx.dtype == vy.dtype == torch.float32, name
            diff = (vx.cpu() - vy.cpu()).abs()
            assert diff.mean() < mean_tol and diff.max() < max_tol, (
                name,
                diff.mean().item(),
                diff.max().item(),
            )


def test_dali_cpu_and_pyav_give_the_same_batches(tiny_shards: Path, kit):
    train = {}
    evaluation = {}
    for backend in ("pyav", "dali"):
        cfg = kit.tiny_config(tiny_shards, backend=backend, num_workers=2, dali_device="cpu")
        loader = make_train_loader(cfg, seed=7, step=3)
        train[backend] = list(itertools.islice(loader, 3))
        assert loader.backend == ("pyav" if backend == "pyav" else "dali-cpu")
        evaluation[backend] = list(make_eval_loader(cfg, split="test", clips=2, crops=3))
    # Identical decoding (both libavcodec, same colour conversion); the resizers differ by rounding only.
    assert_same_batches(train["pyav"], train["dali"], mean_tol=0.01, max_tol=0.35)
    assert_same_batches(evaluation["pyav"], evaluation["dali"], mean_tol=0.01, max_tol=0.35)
    assert sum(len(b) for b in evaluation["dali"]) == 12 * 2 * 3


def dali_view(data: bytes, start: int, count: int, stride: int, box, size: int, flip: bool) -> torch.Tensor:
    """One view the DALI way: fn.decoders.video (CPU), fn.resize on a pixel ROI, fn.flip."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        clip = fn.decoders.video(
            encoded, device="cpu", start_frame=start, sequence_length=count, stride=stride
        )
        out = fn.resize(
            clip,
            size=[size, size],
            roi_start=[float(box[0]), float(box[1])],
            roi_end=[float(box[2]), float(box[3])],
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        return fn.flip(out, horizontal=int(flip))

    pipe = graph()
    pipe.build()
    return torch.from_numpy(np.array(pipe.run()[0][0]))


def test_pyav_views_match_dali_decode_and_resize(kit):
    """The PyAV path resamples the YUV planes and converts the view; DALI converts whole frames, then resizes a
    pixel ROI: equal up to rounding on in-gamut colours, also for odd frame sizes, odd boxes and flips."""
    data = kit.encode_vp9(kit.moving_frames(2.0, 3, width=67, height=49))
    clip = decode_frames(data, 2, 6, 2)
    # (y0, x0, y1, x1), size, flip: the frame's edges, odd offsets, upscaling and downscaling
    views = [((0, 0, 49, 67), 32, False), ((3, 7, 40, 52), 48, True), ((10, 1, 23, 20), 16, False)]
    views.append(((0, 30, 49, 67), 20, True))
    for box, size, flip in views:
        expected = dali_view(data, 2, 6, 2, box, size, flip).int()
        ours = crop_resize(clip, np.array(box), size, flip).int()
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max() <= 1, (box, size, flip)


def test_dali_decode_error_names_the_sample(tmp_path: Path, kit, clip_samples):
    broken = kit.FakeSample(
        clip_samples[0].key,
        clip_samples[0].meta,
        {**clip_samples[0].members, "video.mp4": b"\x1a\x45\xdf\xa3" * 300},
    )
    kit.write_shards(tmp_path, [clip_samples[1], broken, clip_samples[3]], "train", 3)
    cfg = kit.tiny_config(tmp_path, backend="dali", dali_device="cpu", batch_size=3)
    with pytest.raises(RuntimeError, match=rf"{broken.key}.*xkd-shard verify"):
        list(make_eval_loader(cfg, split="train", clips=1))


@pytest.mark.gpu
def test_dali_mixed_matches_cpu(tmp_path: Path, kit):
    # NVDEC decodes VP9 from 128 x 128 up, the shards' default short side; the tiny 64 x 48 clips are too small.
    samples = [
        kit.make_sample(
            f"c/{i}.mp4", i % 2, 3.0, kit.moving_frames(3.0, i, 176, 128), kit.tone(3.0, [(0.0, 440.0)])
        )
        for i in range(4)
    ]
    kit.write_shards(tmp_path, samples, "train", 2)
    batches = {}
    for device in ("mixed", "cpu"):
        cfg = kit.tiny_config(tmp_path, backend="dali", dali_device=device, num_workers=2, batch_size=2)
        loader = make_train_loader(cfg, seed=1)
        batches[device] = list(itertools.islice(loader, 3))
        assert loader.backend == f"dali-{device}"
    assert batches["mixed"][0].video_global.is_cuda
    # NVDEC and libavcodec both decode VP9 exactly; colour conversion and resampling run in different kernels.
    assert_same_batches(batches["mixed"], batches["cpu"], mean_tol=0.02, max_tol=0.5)
