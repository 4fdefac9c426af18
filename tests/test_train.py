"""Tests of `train.py`: schedules, optimiser groups, a tiny run end to end with logs, checkpoints and export,
exact resume, the non-finite stop, gradient accumulation (MR-only and the per-micro-batch KD/MMD behaviour of the
full objective), the config presets, and two processes on gloo through `accelerate launch`.

The data loader is replaced (pytest's monkeypatch) by a synthetic stream with the pipeline's signature whose n-th
sample is a pure function of (seed, start step, rank, n), so runs are reproducible without shards.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

import train
from xkd.model import ModelConfig, build_encoder
from xkd.pipeline.batch import Batch
from xkd.pipeline.config import DataConfig

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_EPOCH = 40


def tiny_config(
    tmp_path: Path, objective: str = "full", variant: str = "xkd", **overrides: object
) -> train.TrainConfig:
    """The house-style tiny geometry (depth 2, dim 32, 8 px patches, 16 mel bins) on CPU, fp32, no trackers."""
    model = ModelConfig.from_name("tiny", objective=objective, variant=variant)
    data = DataConfig(
        video_frames=model.video_frames, video_size=model.video_size, video_local_frames=model.video_local_frames,
        video_local_size=model.video_local_size, video_local_views=model.video_local_views,
        audio_mel_bins=model.audio_mels, audio_mel_frames=model.audio_frames,
        audio_local_mel_frames=model.audio_local_frames, audio_local_views=model.audio_local_views,
    )  # fmt: skip
    base = dict(
        name="tiny", runs_dir=tmp_path / "runs", model=model, data=data, epochs=2, warmup_epochs=1,
        teacher_temp_warmup_epochs=1, batch_size=4, lr=1e-3, log_every=1, checkpoint_every=2, trackers=[],
        precision="fp32", seed=7,
    )  # fmt: skip
    return train.TrainConfig(**(base | overrides))


def synthetic_loader(cfg: DataConfig, rank: int, world_size: int, seed: int, step: int):
    """`make_train_loader`'s signature. Sample n of a stream started at `step` depends only on (seed, step, rank,
    n); its key names the global sample id n * world_size + rank, so ranks never share a sample."""
    n = 0
    while True:
        rows = []
        for _ in range(cfg.batch_size):
            g = torch.Generator().manual_seed(
                (((seed * 1_000_003 + step) * 1009 + rank) * 100_003 + n) % 2**62
            )
            rows.append(
                (
                    torch.randn(3, cfg.video_frames, cfg.video_size, cfg.video_size, generator=g),
                    torch.randn(cfg.video_local_views, 3, cfg.video_local_frames, cfg.video_local_size,
                                cfg.video_local_size, generator=g),
                    torch.randn(1, cfg.audio_mel_bins, cfg.audio_mel_frames, generator=g),
                    torch.randn(cfg.audio_local_views, 1, cfg.audio_mel_bins, cfg.audio_local_mel_frames, generator=g),
                    f"s{step}-{n * world_size + rank}",
                )
            )  # fmt: skip
            n += 1
        vg, vl, ag, al, keys = zip(*rows)
        yield Batch(
            video_global=torch.stack(vg), video_local=torch.stack(vl, dim=1), audio_global=torch.stack(ag),
            audio_local=torch.stack(al, dim=1), label=torch.arange(len(keys)) % 3, key=list(keys),
            start_s=torch.zeros(len(keys)), clip_index=torch.zeros(len(keys), dtype=torch.int64),
        )  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; each test starts as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Synthetic data in place of the pipeline, and a record of every `train_step`: its metrics, the batch keys, the
    teacher state and the RNG state on entry."""
    monkeypatch.setattr(train, "make_train_loader", synthetic_loader)
    monkeypatch.setattr(train, "dataset_info", lambda shards: {"counts": {"train": SAMPLES_PER_EPOCH}})
    steps: list[dict] = []
    real_step = train.train_step

    def recording_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra):
        entry = {
            "keys": [k for b in batches for k in b.key],
            "rng": torch.get_rng_state(),
            "teacher": None if teacher is None else copy.deepcopy(teacher.state_dict()),
            "raw": copy.deepcopy(raw),
            "teacher_module": copy.deepcopy(teacher),
            "batches": batches,
        }
        metrics = real_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra)
        entry["metrics"] = {k: v.item() for k, v in metrics.items()}
        entry["after"] = {k: v.detach().clone() for k, v in raw.state_dict().items()}
        entry["teacher_after"] = None if teacher is None else copy.deepcopy(teacher.state_dict())
        steps.append(entry)
        return metrics

    monkeypatch.setattr(train, "train_step", recording_step)
    return steps


def sample_keyed_masking(tokens: torch.Tensor, mask_ratio: float):
    """`random_masking` with noise computed from each sample's own tokens instead of the global RNG, so a sample
    gets the same mask whichever micro-batch it is in (the real function draws masks in batch order)."""
    from xkd.model.masking import keep_count

    b, n, d = tokens.shape
    keep = keep_count(n, mask_ratio)
    noise = torch.sin(tokens.detach().float().sum(-1) * 1e3)  # (B, N), a function of the sample alone
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


# ---------------------------------------------------------------------------------------------------------------


def test_schedules_match_hand_computed_values(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, variant="mas", epochs=10, warmup_epochs=2, teacher_temp_warmup_epochs=3)
    spe = 10  # total 100 steps, LR warmup 20, temperature warmup 30
    assert train.lr_at(cfg, 0, spe) == pytest.approx(1e-3 / 20)
    assert train.lr_at(cfg, 9, spe) == pytest.approx(1e-3 / 2)
    assert train.lr_at(cfg, 19, spe) == pytest.approx(1e-3)  # warmup ends at the peak
    assert train.lr_at(cfg, 20, spe) == pytest.approx(1e-3)
    assert train.lr_at(cfg, 60, spe) == pytest.approx(0.5e-3)  # half-way through the cosine
    assert train.lr_at(cfg, 40, spe) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(cfg, 100, spe) == pytest.approx(0.0, abs=1e-12)
    assert train.ema_momentum_at(cfg, 0, spe) == pytest.approx(0.997)
    assert train.ema_momentum_at(cfg, 50, spe) == pytest.approx(0.9985)
    assert train.ema_momentum_at(cfg, 100, spe) == pytest.approx(1.0)
    # MAS: video 0.09 -> 0.11, audio 0.04 -> 0.06, linear per step over 30 steps, then constant.
    assert train.teacher_temp_at(cfg, 0, spe) == pytest.approx((0.09, 0.04))
    assert train.teacher_temp_at(cfg, 15, spe) == pytest.approx((0.10, 0.05))
    assert train.teacher_temp_at(cfg, 30, spe) == pytest.approx((0.11, 0.06))
    assert train.teacher_temp_at(cfg, 99, spe) == pytest.approx((0.11, 0.06))
    xkd = tiny_config(tmp_path)  # XKD: constant 0.1 / 0.07
    assert train.teacher_temp_at(xkd, 3, spe) == pytest.approx((0.1, 0.07))


def test_optimizer_groups_follow_the_paper(tmp_path: Path) -> None:
    from xkd.model import XKD

    student = XKD(tiny_config(tmp_path).model)
    opt = train.build_optimizer(student, tiny_config(tmp_path), fused=False)
    decayed, undecayed = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)
    for name, p in student.named_parameters():
        if not p.requires_grad:  # the heads' weight-norm magnitude is frozen
            assert id(p) not in decayed | undecayed, name
        elif name.endswith(".bias") or p.ndim == 1:
            assert id(p) in undecayed, name
        else:
            assert id(p) in decayed, name
    names = {n for n, p in student.named_parameters() if id(p) in decayed}
    for token in ("cls_token", "pos_embed", "mask_token"):  # 3-D tokens are decayed, as in DINO's rule
        assert any(token in n for n in names), token


@pytest.mark.parametrize("mode", ["per_param", "global_norm", "none"])
def test_gradient_clipping_covers_the_student_backbones_and_heads_only(
    tmp_path: Path, recorder: list[dict], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    seen: dict[str, float] = {}
    real_build = train.build_optimizer

    def build(student, cfg, fused):  # record each gradient's norm as the optimizer receives it
        optimizer, names = real_build(student, cfg, fused), {id(p): n for n, p in student.named_parameters()}
        real_step = optimizer.step

        def step(*args, **kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.update({names[id(p)]: p.grad.norm().item() for p in params})
            return real_step(*args, **kwargs)

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", build)
    clip = 1e-3
    train.main(tiny_config(tmp_path, max_steps=1, grad_clip=clip, grad_clip_mode=mode))
    clipped = [v for n, v in seen.items() if n.startswith(("encoder.", "head."))]
    decoders = [v for n, v in seen.items() if n.startswith("decoder.")]
    assert clipped and max(decoders) > 10 * clip  # the decoders are never clipped
    if mode == "per_param":
        assert max(clipped) <= clip * 1.0001
    elif mode == "global_norm":
        assert math.sqrt(sum(v * v for v in clipped)) <= clip * 1.0001
    else:
        assert max(clipped) > 10 * clip


def test_tiny_run_trains_logs_checkpoints_and_exports(tmp_path: Path, recorder: list[dict]) -> None:
    cfg = tiny_config(tmp_path, max_steps=3, trackers=["tensorboard"], keep_last=1, precision="auto")
    run = train.main(cfg)
    assert len(recorder) == 3
    for step in recorder:
        terms = {k: v for k, v in step["metrics"].items() if k.startswith("loss/")}
        assert {"loss/total", "loss/recon_video", "loss/recon_audio", "loss/kd_a2v", "loss/kd_v2a"} <= set(
            terms
        )
        assert {"loss/kd", "loss/da", "grad/norm"} <= set(step["metrics"])
        assert all(math.isfinite(v) for v in step["metrics"].values()), step["metrics"]
    assert recorder[0]["after"].keys() and any(
        not torch.equal(recorder[0]["raw"].state_dict()[k], v) for k, v in recorder[0]["after"].items()
    ), "the first step must move the weights (warmup starts above LR 0)"
    # Layout of contracts.md: resolved config, TensorBoard events, checkpoints (keep_last=1), export.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["precision"], saved["data"]["batch_size"], saved["model"]["depth"]) == ("fp32", 4, 2)
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]
    tensors = load_file(run / "export" / "encoders.safetensors")
    prefixes = {".".join(k.split(".")[:2]) for k in tensors}
    assert prefixes == {"student.video", "student.audio", "teacher.video", "teacher.audio"}
    model_cfg = ModelConfig(**yaml.safe_load((run / "export" / "model.yaml").read_text()))
    assert model_cfg == cfg.model
    data = json.loads((run / "export" / "data.json").read_text())
    assert (data["mel_mean"], data["mel_std"], data["video_fps"], data["video_size"]) == (
        pytest.approx(-5.3688107),
        pytest.approx(4.410007),
        8.0,
        32,
    )
    for role in ("student", "teacher"):
        for m in ("video", "audio"):
            enc = build_encoder(model_cfg, m)
            prefix = f"{role}.{m}."
            enc.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    # The saved config is a valid --config: parsing it gives back the run's config.
    resolved = dataclasses.replace(cfg, precision="fp32", data=dataclasses.replace(cfg.data, batch_size=4))
    assert train.parse_config(["--config", str(run / "config.yaml")]) == resolved
    # Resume is strict: a checkpoint of another world size, or a folder that is no checkpoint, is refused.
    other = tmp_path / "two_ranks"
    shutil.copytree(run / "checkpoints" / "step_00000003", other)
    shutil.copy(other / "rng_0.pt", other / "rng_1.pt")
    with pytest.raises(RuntimeError, match="RNG states of 2 processes but this run has 1"):
        train.load_checkpoint(Accelerator(), other)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        train.load_checkpoint(Accelerator(), run / "export")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: GradScaler, unscale before clipping
def test_mixed_precision_paths_train_on_cpu(tmp_path: Path, recorder: list[dict], precision: str) -> None:
    train.main(tiny_config(tmp_path, max_steps=2, precision=precision, grad_accum_steps=2))
    assert all(math.isfinite(v) for step in recorder for v in step["metrics"].values())


@pytest.mark.parametrize("variant", ["xkd", "mats"])  # MATS: blocks shared by both students and both teachers
def test_resume_reproduces_the_uninterrupted_run_exactly(
    tmp_path: Path, recorder: list[dict], variant: str
) -> None:
    train.main(tiny_config(tmp_path, name="straight", max_steps=4, variant=variant))
    straight = list(recorder)
    recorder.clear()
    # A run "killed" after its step-2 checkpoint, then started again: --resume auto continues at step 2.
    train.main(tiny_config(tmp_path, name="split", max_steps=2, variant=variant))
    train.main(tiny_config(tmp_path, name="split", max_steps=4, variant=variant))
    split = list(recorder)
    assert len(straight) == len(split) == 4
    for a, b in zip(straight, split):
        assert a["keys"] == b["keys"]
        assert a["metrics"] == b["metrics"]  # exactly, every loss term
        assert torch.equal(a["rng"], b["rng"])  # the RNG on entry to the step
        for k, v in a["teacher"].items():  # teachers and KD centers, bit for bit
            assert torch.equal(v, b["teacher"][k]), k
        for k, v in a["after"].items():
            assert torch.equal(v, b["after"][k]), k
    assert not torch.equal(straight[2]["teacher"]["center_video"], torch.zeros(1, 64))  # centers have moved
    final = [tmp_path / "runs" / run / "checkpoints" / "step_00000004" for run in ("straight", "split")]
    assert (final[0] / "model.safetensors").read_bytes() == (final[1] / "model.safetensors").read_bytes()
    rng = [torch.load(f / "rng_0.pt", weights_only=True) for f in final]
    assert torch.equal(rng[0]["torch"], rng[1]["torch"]) and rng[0]["python"] == rng[1]["python"]


def test_mats_trains_exactly_as_mas(tmp_path: Path, recorder: list[dict]) -> None:
    # With one EMA update per step (method sheet decision 5), MAS's two teacher stacks are copies of one student
    # stack that follow it identically, so MATS's single shared teacher stack gives the same run bit for bit: the
    # variants differ in memory only (the paper's MATS numbers differ through the release's double EMA).
    for variant in ("mas", "mats"):
        train.main(tiny_config(tmp_path, name=variant, max_steps=3, variant=variant))
    mas, mats = recorder[:3], recorder[3:]
    assert len(mats) == 3
    for a, b in zip(mas, mats):
        assert a["metrics"] == b["metrics"]
        assert a["after"].keys() == b["after"].keys()
        assert all(torch.equal(v, b["after"][k]) for k, v in a["after"].items())
        assert a["teacher_after"].keys() == b["teacher_after"].keys()
        assert all(torch.equal(v, b["teacher_after"][k]) for k, v in a["teacher_after"].items())


def test_non_finite_loss_stops_with_the_step_and_term_after_saving(
    tmp_path: Path, recorder: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    def poisoned(cfg, rank, world_size, seed, step):
        for i, batch in enumerate(synthetic_loader(cfg, rank, world_size, seed, step)):
            if step + i == 1:
                batch.audio_global[0, 0, 0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(train, "make_train_loader", poisoned)
    cfg = tiny_config(tmp_path, max_steps=4, objective="mr")
    with pytest.raises(train.NonFiniteLossError, match=r"loss/recon_audio.* at step 1"):
        train.main(cfg)
    # The inspection checkpoint holds the weights from before the failing update; --resume auto ignores it.
    saved = load_file(cfg.runs_dir / "tiny" / "checkpoints" / "nonfinite_step_00000001" / "model.safetensors")
    (before,) = [step["after"] for step in recorder]  # step 0 completed, step 1 raised
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], v) for k, v in before.items())
    assert train.checkpoint_to_resume(cfg) is None


def test_mr_accumulating_two_micro_batches_equals_one_double_batch(
    tmp_path: Path, recorder: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("xkd.model.encoder.random_masking", sample_keyed_masking)
    train.main(tiny_config(tmp_path, name="one", objective="mr", batch_size=8, max_steps=1))
    train.main(
        tiny_config(tmp_path, name="two", objective="mr", batch_size=8, grad_accum_steps=2, max_steps=1)
    )
    one, two = recorder
    assert one["keys"] == two["keys"]
    assert two["metrics"]["loss/total"] == pytest.approx(one["metrics"]["loss/total"], rel=1e-5)
    assert two["metrics"]["grad/norm"] == pytest.approx(one["metrics"]["grad/norm"], rel=1e-4)
    before = one["raw"].state_dict()
    assert any(not torch.equal(before[k], v) for k, v in one["after"].items())
    for k, v in one["after"].items():  # first Adam step moves each weight by about lr = 1e-3
        torch.testing.assert_close(two["after"][k], v, rtol=0, atol=1e-6, msg=k)


def test_full_objective_centers_and_mmd_work_per_micro_batch(
    tmp_path: Path, recorder: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented behaviour (docs/training.md): with accumulation the teacher runs on each micro-batch in turn, so
    the KD centers take one EMA step per micro-batch, and the MMD sets are the micro-batches, not the 2B batch."""
    monkeypatch.setattr("xkd.model.encoder.random_masking", sample_keyed_masking)
    train.main(tiny_config(tmp_path, batch_size=8, grad_accum_steps=2, max_steps=1))
    (step,) = recorder
    micro = step["batches"]
    whole = Batch(
        torch.cat([b.video_global for b in micro]), torch.cat([b.video_local for b in micro], 1),
        torch.cat([b.audio_global for b in micro]), torch.cat([b.audio_local for b in micro], 1),
        torch.cat([b.label for b in micro]), [k for b in micro for k in b.key], torch.zeros(8),
        torch.zeros(8, dtype=torch.int64),
    )  # fmt: skip

    def replay(batches: list[Batch]) -> tuple[torch.nn.Module, list[float]]:
        teacher, student, da = copy.deepcopy(step["teacher_module"]), step["raw"], []
        with torch.no_grad():
            for b in batches:
                views = (b.video_global, b.video_local, b.audio_global, b.audio_local)
                targets = teacher(*views, temp_video=0.1, temp_audio=0.07)
                da.append(student(*views, targets=targets)["da"].item())
        return teacher, da

    per_micro, da_micro = replay(micro)
    at_once, da_whole = replay([whole])
    for name in ("center_video", "center_audio"):
        torch.testing.assert_close(
            step["teacher_after"][name], getattr(per_micro, name), rtol=1e-6, atol=1e-7
        )
        assert not torch.allclose(step["teacher_after"][name], getattr(at_once, name), rtol=1e-4, atol=1e-6)
    assert step["metrics"]["loss/da"] == pytest.approx(sum(da_micro) / 2, rel=1e-5)
    assert step["metrics"]["loss/da"] != pytest.approx(da_whole[0], rel=1e-3)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_parses_into_a_consistent_config(preset: str) -> None:
    cfg = train.parse_config(["--config", str(REPO / "configs" / preset)])
    expected = {
        "demo.yaml": ("xkd", "full"), "demo-ablation.yaml": ("xkd", "full"), "demo-ablation-rel.yaml": ("xkd", "full"),
        "xkd_k400.yaml": ("xkd", "full"),
        "xkd_mas_k400.yaml": ("mas", "full"), "xkd_mats_k400.yaml": ("mats", "full"), "ablation_mr.yaml": ("xkd", "mr"),
        "ablation_mr_video.yaml": ("xkd", "mr_video"), "ablation_mr_kd.yaml": ("xkd", "mr_kd"),
        "ablation_mr_da.yaml": ("xkd", "mr_da"),
    }  # fmt: skip
    assert (cfg.model.variant, cfg.model.objective) == expected[preset]
    # demo-ablation.yaml is demo.yaml with the two documented demo-scale deviations (docs/ablation.md).
    if preset == "demo-ablation.yaml":
        demo = train.parse_config(["--config", str(REPO / "configs" / "demo.yaml")])
        deviations = {"lr": 1e-3, "model": dataclasses.replace(demo.model, video_mask_ratio=0.5)}
        assert dataclasses.replace(demo, name="demo-ablation", **deviations) == cfg
        return
    # demo-ablation-rel.yaml is demo-ablation.yaml with spread-relative teacher temperatures, nothing else.
    if preset == "demo-ablation-rel.yaml":
        base = train.parse_config(["--config", str(REPO / "configs" / "demo-ablation.yaml")])
        relative = dataclasses.replace(base.model, teacher_temp_relative=True)
        assert dataclasses.replace(base, name="demo-ablation-rel", model=relative) == cfg
        return
    if preset == "demo.yaml":
        return
    # The paper's optimisation (method sheet 4), ViT-B, and the per-variant values of method sheet 1.6.
    paper = (800, 256, 1e-4, 30, 0.3, (0.9, 0.95), 0.997, 0.3, "per_param")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_epochs, cfg.weight_decay, cfg.betas, cfg.ema_momentum,
            cfg.grad_clip, cfg.grad_clip_mode) == paper  # fmt: skip
    views = 3 if cfg.model.variant != "xkd" else 0 if cfg.model.objective in ("mr", "mr_video") else 1
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.video_local_views) == (768, 12, views)
    temps = (0.09, 0.11, 0.04, 0.06) if cfg.model.variant != "xkd" else (0.1, 0.1, 0.07, 0.07)
    m = cfg.model
    assert (m.teacher_temp_video_start, m.teacher_temp_video_end, m.teacher_temp_audio_start,
            m.teacher_temp_audio_end) == temps  # fmt: skip


def test_cli_defaults_to_the_demo_preset_and_applies_dotted_overrides() -> None:
    cfg = train.parse_config(
        ["--max_steps", "5", "--model.depth", "3", "--data.num-workers=0", "--keep-last", "7"]
    )
    assert (cfg.name, cfg.make_demo_data, cfg.max_steps, cfg.model.depth) == ("demo", True, 5, 3)
    assert (cfg.data.num_workers, cfg.keep_last) == (0, 7)  # dashes and underscores alike
    with pytest.raises(SystemExit):
        train.parse_config(["--model.dept", "3"])
    with pytest.raises((SystemExit, ValueError)):
        train.parse_config(["--data.video_size", "48"])  # no longer the model's geometry


@pytest.mark.slow
def test_demo_preset_end_to_end_on_real_shards_with_exact_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The no-argument path: the demo preset generates the demo dataset (the `--mini` size here) and shards it with
    xkd-shard, the real pipeline feeds training, checkpoints and the export are written, and a run resumed from
    its step-2 checkpoint repeats the uninterrupted run's batches and losses exactly."""
    from xkd.sharding import demo

    real_demo, losses = demo.main, {}
    monkeypatch.setattr(demo, "main", lambda argv: real_demo([*argv, "--mini", "--workers", "1"]))
    real_step = train.train_step

    def recording_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra):
        metrics = real_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra)
        keys = sorted(k for b in batches for k in b.key)
        losses.setdefault(cfg.name, []).append((keys, {k: v.item() for k, v in metrics.items()}))
        return metrics

    monkeypatch.setattr(train, "train_step", recording_step)
    monkeypatch.chdir(tmp_path)  # the preset's data/demo/shards and runs/ land here
    args = ["--batch_size", "4", "--checkpoint_every", "2", "--data.num_workers", "1", "--trackers", "[]"]
    train.main(train.parse_config([*args, "--max_steps", "4", "--name", "straight"]))
    assert json.loads(Path("data/demo/shards/dataset.json").read_text())["counts"]["train"] == 9
    train.main(train.parse_config([*args, "--max_steps", "2", "--name", "split"]))
    train.main(train.parse_config([*args, "--max_steps", "4", "--name", "split"]))
    assert len(losses["straight"]) == len(losses["split"]) == 4
    assert losses["straight"] == losses["split"]
    assert all(math.isfinite(v) for _, m in losses["straight"] for v in m.values())
    exported = {p.name for p in Path("runs/straight/export").iterdir()}
    assert exported == {"encoders.safetensors", "model.yaml", "data.json"}


def ddp_worker(out_dir: Path, max_steps: int) -> None:
    """Body of the 2-process test, run by each rank under `accelerate launch`: train (or resume) up to `max_steps`
    and record per step the batch keys, the loss and hashes of the student and teacher weights."""
    import hashlib

    records = []
    real_step = train.train_step

    def digest(module: torch.nn.Module) -> str:
        return hashlib.sha256(
            b"".join(v.detach().numpy().tobytes() for v in module.state_dict().values())
        ).hexdigest()

    def recording_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra):
        metrics = real_step(accelerator, student, raw, teacher, optimizer, batches, sched, cfg, *extra)
        keys = [k for b in batches for k in b.key]
        records.append(
            {
                "keys": keys,
                "loss": metrics["loss/total"].item(),
                "student": digest(raw),
                "teacher": digest(teacher),
            }
        )
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_loader", synthetic_loader)
        mp.setattr(train, "dataset_info", lambda shards: {"counts": {"train": SAMPLES_PER_EPOCH}})
        mp.setattr(train, "train_step", recording_step)
        train.main(tiny_config(out_dir, max_steps=max_steps))
    (out_dir / f"rank{os.environ['RANK']}_to{max_steps}.json").write_text(json.dumps(records))


DDP_SCRIPT = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("test_train_ddp", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.ddp_worker(Path(sys.argv[2]), int(sys.argv[3]))
"""


@pytest.mark.slow
def test_two_processes_get_disjoint_data_and_keep_identical_weights(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for max_steps in (2, 3):  # the second launch is a requeued job: --resume auto continues from step 2
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), str(script), __file__, str(tmp_path), str(max_steps),
        ]  # fmt: skip
        # Own process group: on a timeout the ranks go too, not just the launcher.
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        assert proc.returncode == 0, output[-6000:]
    ranks = [
        sum((json.loads((tmp_path / f"rank{r}_to{n}.json").read_text()) for n in (2, 3)), []) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 2 steps, then resumed for the third
    for a, b in zip(*ranks):
        assert not set(a["keys"]) & set(b["keys"]) and len(a["keys"]) == 2  # batch 4 = 2 ranks x 2
        assert a["loss"] != b["loss"]  # each rank trained on its own data
        assert a["student"] == b["student"] and a["teacher"] == b["teacher"]  # yet identical weights
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in checkpoint.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]


def test_uniform_teacher_targets_warn_once_per_direction() -> None:
    warned: set[str] = set()
    healthy = {"diag/teacher_entropy_a2v": 0.9 * math.log(64), "diag/teacher_entropy_v2a": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.warn_uniform_targets(healthy, 64, 10, warned)  # below 95% of ln K: silent
    collapsed = {"diag/teacher_entropy_a2v": 4.08, "diag/teacher_entropy_v2a": 1.0}
    with pytest.warns(
        UserWarning, match=r"step 20: the a2v teacher targets are nearly uniform \(entropy 4.08"
    ):
        train.warn_uniform_targets(collapsed, 64, 20, warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.warn_uniform_targets(collapsed, 64, 30, warned)  # reported once
    assert warned == {"a2v"}
