"""Tests of the GPU benchmarks of issue 9 that run on a CPU: `benchmarks/train_step.py` end to end on the tiny
preset (synthetic batches and the real PyAV loader), its batch search and release baselines, and the wheel
packing of `benchmarks/gpu_suite.py` that feeds the GPU machine."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from benchmarks import gpu_suite
from benchmarks.train_step import largest_batch, release_clip_gradients, release_ema_update, synthetic_batch
from xkd.model import XKD, ModelConfig, XKDTeacher
from xkd.sharding.mel import SAMPLE_RATE, log_mel
from xkd.sharding.schema import JSON_EXT, MEL_EXT, VIDEO_EXT, SampleMeta, make_key, shard_name
from xkd.sharding.writer import ShardFile

REPO = Path(__file__).resolve().parents[1]
PHASES = {"teacher_fwd", "student_fwd", "backward", "clip", "adamw", "ema", "total", "other"}
ROW_KEYS = {"status", "samples_per_s", "step_ms", "phases_ms", "data_wait_ms", "data_wait_frac", "tflops"}
ROW_KEYS |= {"mfu_measured", "mfu_reference", "mfu_datasheet", "cell", "batch", "data", "steps", "warmup"}
ROW_KEYS |= {"precision", "grad_scaler", "skipped_updates"}
# The tiny preset with the shards' 80 mel bins and 1 s windows (8 frames at 8 fps, 112 mel frames).
LOADER_GEOMETRY = ["--set", "audio_mels=80", "--set", "audio_frames=112", "--set", "audio_local_frames=56"]


def bench(tmp_path: Path, *args: str) -> dict:
    """Run the benchmark CLI on the CPU with tiny settings; returns its JSON report."""
    out = tmp_path / "train_step.md"
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--size", "tiny", "--device", "cpu", "--steps", "2"]
    cmd += ["--warmup", "1", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert "| cell | batch | data | samples/s |" in out.read_text()
    return report


def write_tiny_shards(out: Path, clips: int = 4, seconds: float = 2.0) -> None:
    """VP9-in-MP4 clips (PyAV's libvpx-vp9) of moving colour bars with a tone each, in two train shards."""
    fps, width, height = 8, 64, 48
    samples = []
    for i in range(clips):
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream("libvpx-vp9", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = 8  # a keyframe every 8 frames, as xkd-shard writes
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
            for t in range(int(seconds * fps)):
                bars = (np.arange(width)[None, :, None] * 4 + 16 * t + 60 * i + np.array([0, 85, 170])) % 256
                frame = np.broadcast_to(bars, (height, width, 3)).astype(np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        time = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        mel = log_mel(0.5 * torch.sin(2 * torch.pi * (300 + 100 * i) * time)).numpy().astype(np.float16)
        npy = io.BytesIO()
        np.save(npy, mel, allow_pickle=False)
        source = f"c{i % 2}/clip{i}.mp4"
        meta = SampleMeta(
            key=make_key("bench", source),
            dataset="bench",
            source=source,
            split="train",
            label=i % 2,
            label_name=f"c{i % 2}",
            duration_s=seconds,
            fps=float(fps),
            num_frames=int(seconds * fps),
            mel_frames=mel.shape[1],
            has_audio=True,
            width=width,
            height=height,
        )
        samples.append(
            (meta.key, [(VIDEO_EXT, buf.getvalue()), (MEL_EXT, npy.getvalue()), (JSON_EXT, meta.to_json())])
        )
    out.mkdir(parents=True)
    for index in range(2):
        shard = ShardFile(out, shard_name("train", index))
        for key, members in samples[index::2]:
            shard.add(key, members)
        shard.close()
    (out / "dataset.json").write_text(json.dumps({"classes": ["c0", "c1"]}))


@pytest.mark.slow
def test_train_step_matrix_with_the_pyav_loader(tmp_path: Path) -> None:
    """The CLI end to end on the CPU: device probe and ceiling, two cells of the matrix (train.py's step and the
    authors' baseline) fed by the real PyAV loader, the ratio between them, and the report files."""
    shards = tmp_path / "shards"
    write_tiny_shards(shards)
    args = ["--batch", "2", "--cells", "sdpa-bf16,authors-fp16", "--ceiling-size", "64", "--loader"]
    report = bench(
        tmp_path, *LOADER_GEOMETRY, *args, "--shards", str(shards), "--backend", "pyav", "--num-workers", "0"
    )
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"].startswith(
        "CPU"
    )
    assert report["ceiling"]["status"] == "ok" and report["ceilings"]["measured"] > 0
    assert report["gflops_per_sample"] > 0
    rows = {r["cell"]: r for r in report["rows"]}
    assert set(rows) == {"sdpa-bf16", "authors-fp16"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert set(row) >= ROW_KEYS and set(row["phases_ms"]) == PHASES
        # every mark was hit: a phase whose hook never fired would read 0
        assert all(
            row["phases_ms"][p] > 0 for p in ("teacher_fwd", "student_fwd", "backward", "adamw", "ema")
        )
        assert row["data"] == "loader:pyav" and row["batch"] == 2 and row["samples_per_s"] > 0
        assert row["data_wait_ms"] > 0 and 0 < row["data_wait_frac"] < 1
    assert rows["authors-fp16"]["speedup_vs_authors"] == pytest.approx(1.0)
    assert rows["sdpa-bf16"]["speedup_vs_authors"] == pytest.approx(
        rows["sdpa-bf16"]["samples_per_s"] / rows["authors-fp16"]["samples_per_s"]
    )


def test_synthetic_batch_fits_the_model() -> None:
    """The synthetic views the GPU cells train on have the shapes XKD takes (the paper geometry scaled down)."""
    cfg = ModelConfig.from_name("tiny")
    batch = synthetic_batch(cfg, 3, torch.device("cpu"))
    assert batch.video_local.shape == (1, 3, 3, 4, 16, 16) and batch.audio_local.shape == (1, 3, 1, 16, 16)
    assert batch.video_global.std() > 0.5  # random, not zeros
    student = XKD(cfg)
    views = (batch.video_global, batch.video_local, batch.audio_global, batch.audio_local)
    out = student(*views, targets=XKDTeacher(student)(*views, temp_video=0.1, temp_audio=0.07))
    assert torch.isfinite(out["loss"])


def test_largest_batch_doubles_then_bisects() -> None:
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 200

    assert largest_batch(fits, 32, 4096) == 200
    assert tried == [32, 64, 128, 256, 192, 224, 208, 200]
    assert largest_batch(lambda b: True, 32, 100) == 64  # the cap stops the doubling
    assert largest_batch(lambda b: False, 32, 100) == 0


def test_release_baselines_compute_what_train_py_computes() -> None:
    """The authors' loops (the fp16 baseline cell) must do the same maths as train.py's foreach versions, so the
    speed-up compares implementations, not different updates."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    student = XKD(cfg)
    teacher = XKDTeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = copy.deepcopy(teacher)
    expected.update(student, momentum=0.9)
    release_ema_update(teacher, student, 0.9)
    for a, b in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)

    params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(3)]
    for p, scale in zip(params, (0.01, 1.0, 10.0)):
        p.grad = scale * torch.randn(5)
    before = [p.grad.clone() for p in params]
    release_clip_gradients(params, 0.3)
    for p, g in zip(params, before):
        norm = g.norm().item()
        torch.testing.assert_close(p.grad, g if norm <= 0.3 else g * 0.3 / (norm + 1e-6))


def test_pack_splits_wheels_in_set_order_and_reassembles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = tmp_path / "wheels"
    rng = np.random.default_rng(0)
    sizes = {"base": [300_000, 10], "media": [200_000], "dali": [700_000, 5]}
    for name, lengths in sizes.items():
        (wheels / name).mkdir(parents=True)
        for i, length in enumerate(lengths):
            (wheels / name / f"{name}{i}-1.0-py3-none-any.whl").write_bytes(rng.bytes(length))
    folders = gpu_suite.pack(wheels, tmp_path, part_mib=0.5)
    assert [f.name for f in folders] == [".dali-a", ".dali-b", ".dali-c"]
    for folder in folders:
        used = sum(f.stat().st_size for f in folder.rglob("*") if f.name != gpu_suite.MANIFEST)
        assert used <= 0.5 * 2**20
    manifest = json.loads((folders[0] / gpu_suite.MANIFEST).read_text())
    assert {p["folder"] for e in manifest["wheels"] if e["set"] == "base" for p in e["pieces"]} == {".dali-a"}
    # On the machine the folders arrive one per call; a set is complete once every folder holding it was staged.
    monkeypatch.setattr(gpu_suite, "REPO", tmp_path)
    monkeypatch.setattr(gpu_suite, "WORK", tmp_path / "work")
    later = tmp_path / "later"
    later.mkdir()
    for folder in folders[1:]:
        folder.rename(later / folder.name)
    gpu_suite.stage(manifest)
    assert gpu_suite.missing_folders(manifest, "base") == []
    assert gpu_suite.missing_folders(manifest, "media") == [".dali-b"]
    assert gpu_suite.missing_folders(manifest, "dali") == [".dali-b", ".dali-c"]
    for folder in folders[1:]:
        (later / folder.name).rename(folder)
    gpu_suite.stage(manifest)
    assert all(gpu_suite.missing_folders(manifest, name) == [] for name in gpu_suite.SETS)
    for entry in manifest["wheels"]:
        joined = b"".join((tmp_path / "work" / "parts" / p["file"]).read_bytes() for p in entry["pieces"])
        assert joined == (wheels / entry["set"] / entry["name"]).read_bytes()
