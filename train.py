"""XKD pretraining with HuggingFace Accelerate: config, optimiser, schedules, EMA teachers, checkpoint and exact
resume, logging and the weight export (method sheet sections 2.8 and 4; `docs/training.md`).

    accelerate launch train.py                                    # configs/demo.yaml; makes the demo shards if absent
    accelerate launch train.py --config configs/xkd_k400.yaml --data.shards shards/k400 --name k400

One CPU, one GPU, multi-GPU DDP and multi-node runs use the same code. The loop counts optimizer steps (the shard
streams are resampled, so epochs only size the schedules), and every schedule is a pure function of (step,
steps_per_epoch). Students and optimizer go through `accelerator.prepare`; the EMA teachers, which hold the KD
centers, stay outside it and are registered for checkpointing with the `TrainState`. The data stream of each rank is
made from (seed, step, rank) when training starts and again after every checkpoint, so a resumed run sees exactly
the batches the uninterrupted run saw.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from safetensors.torch import save_file
from tqdm.auto import tqdm

from xkd.model import XKD, ModelConfig, XKDTeacher, flops_per_sample
from xkd.pipeline import Batch, DataConfig, dataset_info, make_eval_loader, make_train_loader, mel_stats
from xkd.pipeline.memory import keep_freed_memory

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
# xkd-shard options of the demo data (`make_demo_data`, benchmarks/ablation.py): the clips are 64 px, keep them so
# (no upscaling); small shards give every rank and worker several.
DEMO_SHARD_ARGS = ("--short-side", "64", "--max-shard-samples", "100")
CHECKPOINT = re.compile(r"^step_(\d{8})$")
# View geometry that `ModelConfig` (token grids) and `DataConfig` (what the loader cuts) must agree on.
SHARED_GEOMETRY = (
    ("video_frames", "video_frames"), ("video_size", "video_size"), ("video_local_frames", "video_local_frames"),
    ("video_local_size", "video_local_size"), ("video_local_views", "video_local_views"),
    ("audio_mels", "audio_mel_bins"), ("audio_frames", "audio_mel_frames"),
    ("audio_local_frames", "audio_local_mel_frames"), ("audio_local_views", "audio_local_views"),
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a pretraining run does; defaults are the paper's (method sheet 4). CLI: `parse_config`."""

    name: str = "xkd"
    """Run name: the run writes `<runs_dir>/<name>/{config.yaml,checkpoints,tb,export}`."""
    runs_dir: Path = Path("runs")
    """Parent directory of the run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and losses (`model/config.py`; defaults: the paper's ViT-B XKD)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, views and augmentation (`pipeline/config.py`); `data.batch_size` is set from `batch_size`."""
    make_demo_data: bool = False
    """If `data.shards` has no `dataset.json`, generate the built-in demo dataset and shard it there first."""
    epochs: float = 800
    """Length of the LR and EMA schedules in epochs of `steps_per_epoch` optimizer steps."""
    max_steps: int | None = None
    """Stop after this many optimizer steps without changing the schedules (smoke tests, fixed budgets)."""
    batch_size: int = 256
    """Global batch per optimizer step; each rank's micro-batch is batch_size / (processes x grad_accum_steps)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step. KD centers and MMD work per micro-batch (docs/training.md)."""
    lr: float = 1e-4
    """Peak learning rate for the global batch as given (the paper: 1e-4 at 256, no scaling rule)."""
    warmup_epochs: float = 30
    """Linear LR warmup from 0 over this many epochs, then cosine decay to 0 at the end of `epochs`."""
    weight_decay: float = 0.3
    """AdamW weight decay of the >= 2-D weights (cls/pos/mask tokens included); biases and 1-D params get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    ema_momentum: float = 0.997
    """Teacher EMA momentum at step 0, raised to 1 by a per-step cosine over the whole schedule."""
    teacher_temp_warmup_epochs: float = 30
    """Teacher temperatures go from `model.teacher_temp_*_start` to `_end`, linearly per step, over these epochs."""
    grad_clip: float = 0.3
    """Gradient clipping threshold, applied to the student backbones and heads only (decoders unclipped)."""
    grad_clip_mode: Literal["per_param", "global_norm", "none"] = "per_param"
    """`per_param`: each gradient tensor to L2 norm <= grad_clip (the paper); `global_norm`: clip_grad_norm_."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast precision; `auto`: bf16 on GPUs that support it, else fp32. fp16 uses a GradScaler."""
    seed: int = 99999
    """Seed of the initial weights (same on every rank), the masks (offset by rank) and the data streams."""
    checkpoint_every: int = 1000
    """Optimizer steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Checkpoints kept in `checkpoints/`; older ones are deleted."""
    resume: str = "auto"
    """`auto`: continue from the run's latest checkpoint if there is one; `none`: start fresh; or a checkpoint path."""
    log_every: int = 50
    """Optimizer steps between logged metrics (the only steps that read values back from the device)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers, e.g. `[tensorboard, wandb]`; empty: none."""
    knn_every: int = 0
    """Optimizer steps between kNN probes of the teacher's video encoder on `knn_shards`; 0 disables them."""
    knn_shards: Path | None = None
    """Small labelled shard set (train and test splits, or folds) for the periodic kNN probe."""
    mfu_ceiling_flops: float = 790e12
    """Per-device FLOP/s of `perf/mfu_measured`: the measured H100/H200 bf16 dense-matmul ceiling."""
    mfu_peak_flops: float = 989.4e12
    """Per-device FLOP/s of `perf/mfu_peak`: the H100 SXM datasheet bf16 dense peak."""

    def __post_init__(self) -> None:
        for model_field, data_field in SHARED_GEOMETRY:
            built, cut = getattr(self.model, model_field), getattr(self.data, data_field)
            if built != cut:
                raise ValueError(
                    f"TrainConfig: model.{model_field}={built} but data.{data_field}={cut}: must agree"
                )
        counts = (
            self.batch_size,
            self.grad_accum_steps,
            self.checkpoint_every,
            self.keep_last,
            self.log_every,
        )
        if min(counts) < 1:
            raise ValueError(
                f"TrainConfig: batch_size, grad_accum_steps, *_every, keep_last must be >= 1: {counts}"
            )
        if not 0 <= self.warmup_epochs < self.epochs or self.teacher_temp_warmup_epochs < 0:
            raise ValueError(
                f"TrainConfig: need 0 <= warmup_epochs={self.warmup_epochs} < epochs={self.epochs}"
            )
        if self.knn_every and self.knn_shards is None:
            raise ValueError("TrainConfig: knn_every > 0 needs knn_shards (a small labelled shard set)")


@dataclass
class TrainState:
    """Counters that are not tensors; registered for checkpointing (torchtitan's `TrainState`)."""

    step: int = 0
    """Optimizer steps taken."""
    samples: int = 0
    """Training samples consumed by all ranks."""

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])


class NonFiniteLossError(RuntimeError):
    """A loss term is NaN or infinite; the run stops (method sheet 2.8 g) after saving the state for inspection."""


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup reaching `lr` at the last warmup step (so step 0 is not
    wasted at LR 0), then a half cosine that reaches 0 at step epochs x steps_per_epoch."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / (total - warmup), 1.0)))


def ema_momentum_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Teacher momentum m(k) = 1 - (1 - m0)(1 + cos(pi k / K)) / 2 over K = epochs x steps_per_epoch (sheet 1.5)."""
    progress = min(step / (cfg.epochs * steps_per_epoch), 1.0)
    return 1.0 - (1.0 - cfg.ema_momentum) * (1.0 + math.cos(math.pi * progress)) / 2.0


def teacher_temp_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> tuple[float, float]:
    """(video, audio) teacher temperatures. The paper steps them once per epoch; here they move linearly per
    optimizer step over `teacher_temp_warmup_epochs` (a documented deviation), then stay at the end values."""
    warmup = cfg.teacher_temp_warmup_epochs * steps_per_epoch
    t = min(step / warmup, 1.0) if warmup > 0 else 1.0
    m = cfg.model
    return (
        m.teacher_temp_video_start + t * (m.teacher_temp_video_end - m.teacher_temp_video_start),
        m.teacher_temp_audio_start + t * (m.teacher_temp_audio_end - m.teacher_temp_audio_start),
    )


def build_optimizer(student: XKD, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with the paper's groups (DINO's rule, method sheet 4): biases and 1-D parameters are not decayed;
    every other weight is, cls/pos/mask tokens included. Frozen parameters (the heads' weight-norm g) stay out."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def train_step(
    accelerator: Accelerator,
    student: torch.nn.Module,
    raw_student: XKD,
    teacher: XKDTeacher | None,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    sched: dict[str, float],
    cfg: TrainConfig,
    assignments: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step in the order of method sheet 2.8, over `grad_accum_steps` micro-batches.

    Teacher targets, the KD centers' update and the MMD sets are per micro-batch (DINO's and the release's
    behaviour), so accumulation averages the gradients of per-micro-batch losses. `student` is the prepared module
    (DDP-wrapped when distributed), `raw_student` the same module unwrapped. Returns detached metric tensors; the
    only device sync is the finite check, which must come before the update. With `assignments` (a list), each
    micro-batch with teachers appends a (B, 3) tensor (label, audio teacher argmax, video teacher argmax) for the
    prototype-vs-label NMI that `fit` logs."""
    for group in optimizer.param_groups:
        group["lr"] = sched["sched/lr"]
    temps, outs = {"temp_video": sched["sched/temp_video"], "temp_audio": sched["sched/temp_audio"]}, []
    for b in micro_batches:
        views = (b.video_global, b.video_local, b.audio_global, b.audio_local)
        with accelerator.accumulate(student):
            with accelerator.autocast():
                targets = None
                if teacher is not None:
                    with torch.no_grad():
                        targets = teacher(*views, **temps)
                out = student(*views, targets=targets, labels=b.label)
            if assignments is not None and targets is not None:
                ids = (b.label, targets.probs_audio.argmax(-1), targets.probs_video.argmax(-1))
                assignments.append(torch.stack(ids, dim=1))
            accelerator.backward(out["loss"])
        outs.append({("" if k.startswith("diag/") else "loss/") + k: v.detach() for k, v in out.items()})
    metrics = {k: torch.stack([o[k] for o in outs]).float().mean() for k in outs[0]}
    metrics["loss/total"] = metrics.pop("loss/loss")
    # One all-reduced flag vector: every rank stops at the same step, before a NaN reaches the weights.
    terms = [k for k in metrics if k.startswith("loss/")]
    bad = accelerator.reduce(torch.stack([(~torch.isfinite(metrics[k])).float() for k in terms]), "sum")
    if bad.any():
        raise NonFiniteLossError(", ".join(k for k, n in zip(terms, bad.tolist()) if n))
    accelerator.unscale_gradients()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    metrics["grad/norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # The paper clips the student backbones and heads only; a block stack shared by both encoders (MAS) counts once.
    modules = [*raw_student.encoders().values(), *raw_student.heads().values()]
    clipped = list({id(p): p for m in modules for p in m.parameters() if p.grad is not None}.values())
    if cfg.grad_clip_mode == "per_param" and clipped:  # DINO's `clip_gradients`, one scale per tensor
        grads = [p.grad for p in clipped]
        scale = (cfg.grad_clip / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(scale.unbind()))
    elif cfg.grad_clip_mode == "global_norm" and clipped:
        torch.nn.utils.clip_grad_norm_(clipped, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if teacher is not None:
        teacher.update(raw_student, momentum=sched["sched/ema"])
    return metrics


def fit(
    accelerator: Accelerator,
    cfg: TrainConfig,
    student: torch.nn.Module,
    teacher: XKDTeacher | None,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    steps_per_epoch: int,
) -> XKD:
    """The step loop (counts optimizer steps): data, schedules, `train_step`, logging, kNN probes, checkpoints.
    Returns the unwrapped student."""
    raw = accelerator.unwrap_model(student)  # the one unwrap: EMA updates, clipping, export
    checkpoints = cfg.runs_dir / cfg.name / "checkpoints"
    total = math.ceil(cfg.epochs * steps_per_epoch)
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    flops, world = flops_per_sample(cfg.model), accelerator.num_processes
    loader = None
    bar = tqdm(
        total=stop, initial=state.step, desc=cfg.name, unit="step", disable=not accelerator.is_main_process
    )
    tick, wait, window = time.perf_counter(), 0.0, 0
    assignments: list[torch.Tensor] = []  # (label, teacher argmaxes) since the last log step
    warned: set[str] = set()  # KD directions already reported as collapsed
    while state.step < stop:
        # The stream is made from (seed, step, rank) at the start and after every checkpoint: never fast-forwarded.
        if loader is None:
            loader = make_train_loader(cfg.data, accelerator.process_index, world, cfg.seed, state.step)
        t = time.perf_counter()
        batches = [next(loader).to(accelerator.device) for _ in range(cfg.grad_accum_steps)]
        wait += time.perf_counter() - t
        temp_video, temp_audio = teacher_temp_at(cfg, state.step, steps_per_epoch)
        sched = {
            "sched/lr": lr_at(cfg, state.step, steps_per_epoch),
            "sched/ema": ema_momentum_at(cfg, state.step, steps_per_epoch),
            "sched/temp_video": temp_video,
            "sched/temp_audio": temp_audio,
        }
        try:
            metrics = train_step(
                accelerator, student, raw, teacher, optimizer, batches, sched, cfg, assignments
            )
        except NonFiniteLossError as err:
            path = checkpoints / f"nonfinite_step_{state.step:08d}"
            save_checkpoint(accelerator, path, cfg.keep_last)
            raise NonFiniteLossError(
                f"non-finite {err} at step {state.step}: stopped before the update. The run's state at that step "
                f"(weights and optimizer before the update) is saved for inspection in {path}"
            ) from None
        state.step, state.samples, window = state.step + 1, state.samples + cfg.batch_size, window + 1
        bar.update()
        if state.step % cfg.log_every == 0 or state.step == stop:
            seconds = time.perf_counter() - tick
            rate = window * cfg.batch_size / seconds
            values = {k: v.item() for k, v in metrics.items()} | sched
            values |= {
                "perf/samples_per_s": rate,
                "perf/data_wait_frac": wait / seconds,  # host time blocked on the loader / wall time
                "perf/mfu_measured": flops * rate / (world * cfg.mfu_ceiling_flops),
                "perf/mfu_peak": flops * rate / (world * cfg.mfu_peak_flops),
                "perf/epoch": state.step / steps_per_epoch,
            }
            values |= prototype_nmi(accelerator, assignments)
            assignments.clear()
            warn_uniform_targets(values, cfg.model.head_out_dim, state.step, warned)
            accelerator.log(values, step=state.step)
            bar.set_postfix(loss=f"{values['loss/total']:.4f}", lr=f"{sched['sched/lr']:.2e}")
            tick, wait, window = time.perf_counter(), 0.0, 0
        if cfg.knn_every and state.step % cfg.knn_every == 0 and accelerator.is_main_process:
            accelerator.log(
                {"knn/top1": knn_probe(accelerator, raw if teacher is None else teacher, cfg)},
                step=state.step,
            )
        if state.step % cfg.checkpoint_every == 0 or state.step == stop:
            save_checkpoint(accelerator, checkpoints / f"step_{state.step:08d}", cfg.keep_last)
            loader = None
            tick, wait, window = time.perf_counter(), 0.0, 0
    bar.close()
    return raw


def warn_uniform_targets(values: dict[str, float], k: int, step: int, warned: set[str]) -> None:
    """Warn once per KD direction when the teacher's targets are nearly uniform (mean entropy above 95% of ln K):
    distillation then carries no signal (`../shared/demo-data-findings.md`), while the loss curves look healthy."""
    for direction in ("a2v", "v2a"):
        entropy = values.get(f"diag/teacher_entropy_{direction}")
        if entropy is None or direction in warned or entropy < 0.95 * math.log(k):
            continue
        warned.add(direction)
        warnings.warn(
            f"step {step}: the {direction} teacher targets are nearly uniform (entropy {entropy:.2f} nats, "
            f"ln K = {math.log(k):.2f}): KD has collapsed and teaches nothing from here on. docs/ablation.md "
            "('Why', point 3) gives the diagnostics and what was tried",
            stacklevel=2,
        )


def prototype_nmi(accelerator: Accelerator, assignments: list[torch.Tensor]) -> dict[str, float]:
    """NMI between the labels and the teachers' argmax prototypes over the steps since the last log (demo
    findings: an audio teacher whose clusters ignore the class gives the video student nothing to learn). Only
    labelled samples count; {} without teachers or labels. A collective: every rank calls it at log steps."""
    from sklearn.metrics import normalized_mutual_info_score

    if not assignments:
        return {}
    ids = accelerator.gather(torch.cat(assignments)).cpu().numpy()
    ids = ids[ids[:, 0] >= 0]
    if len(ids) == 0:
        return {}
    return {
        f"diag/prototype_nmi_{direction}": float(normalized_mutual_info_score(ids[:, 0], ids[:, column]))
        for direction, column in (("a2v", 1), ("v2a", 2))
    }


def knn_probe(accelerator: Accelerator, network: XKD | XKDTeacher, cfg: TrainConfig) -> float:
    """Top-1 (%) of a weighted kNN vote (DINO: k=20, T=0.07; eval.py's) of pooled video features: the train split of
    `knn_shards` (fold 1 for fold datasets) votes for its test split, one centre clip per video. Main process only;
    the other ranks wait at their next collective."""
    from eval import knn_scores, topk_accuracy  # eval.py imports this module: import it late

    data = dataclasses.replace(cfg.data, shards=str(cfg.knn_shards), with_audio=False, require_audio=False)
    encoder, split = network.encoders()["video"], {}
    # fork_rng: creating loaders draws from the global generator, which must stay the masks' alone.
    with torch.no_grad(), accelerator.autocast(), torch.random.fork_rng(devices=[]):
        for name in ("train", "test"):
            batches = list(make_eval_loader(data, split=name, clips=1))
            features = [
                encoder.forward_features(b.video_global.to(accelerator.device)).float() for b in batches
            ]
            split[name] = (torch.cat(features).cpu().numpy(), torch.cat([b.label for b in batches]).numpy())
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    classes = int(max(y_train.max(), y_test.max())) + 1
    scores = knn_scores(x_train, y_train, x_test, k=20, temperature=0.07, n_classes=classes)
    return 100 * topk_accuracy(scores, y_test, 1)


def rng_state() -> dict[str, Any]:
    """This rank's generators as tensors and plain numbers, so `torch.load(weights_only=True)` reads them back."""
    numpy = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
        "numpy_rest": (numpy["state"]["pos"], numpy["has_gauss"], numpy["gauss"]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    pos, has_gauss, gauss = state["numpy_rest"]
    key = state["numpy_key"].numpy().astype(np.uint32)
    mt19937 = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    np.random.set_state(mt19937 | {"has_gauss": has_gauss, "gauss": gauss})
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Accelerator, path: Path, keep_last: int) -> Path:
    """Write a checkpoint under a temporary name and rename it once every rank is done, so `--resume auto` never
    picks half a checkpoint; then keep the `keep_last` newest `step_*` ones. Accelerate saves the students
    (safetensors), optimizer, scaler and the registered teachers and TrainState; each rank adds `rng_<rank>.pt`.
    Multi-node runs need a shared file system (docs/training.md)."""
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a job killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in sorted(p for p in path.parent.iterdir() if CHECKPOINT.match(p.name))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """Restore a checkpoint strictly. Accelerate loads the students (safetensors, strict), the optimizer and
    scaler (`weights_only`), and the teachers and TrainState (strict `load_state_dict`; it unpickles them, which
    is why only our own checkpoints are ever loaded). Its RNG restore swallows every error, so each rank's
    generators are then set again from `rng_<rank>.pt` (`weights_only=True`)."""
    ranks = len(list(path.glob("rng_*.pt")))
    if not (path / "model.safetensors").is_file() or ranks == 0:
        raise FileNotFoundError(
            f"--resume {path}: not a checkpoint of train.py (no model.safetensors, rng_*.pt)"
        )
    if ranks != accelerator.num_processes:
        raise RuntimeError(
            f"--resume {path}: the checkpoint holds the RNG states of {ranks} processes but this run has "
            f"{accelerator.num_processes}; resume with {ranks} processes, or start a new run (--resume none)"
        )
    accelerator.load_state(str(path))
    set_rng_state(torch.load(path / f"rng_{accelerator.process_index}.pt", weights_only=True))


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint `cfg.resume` names: `auto` the run's newest `step_*` (None before the first), `none` None."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    folder = cfg.runs_dir / cfg.name / "checkpoints"
    found = sorted(p for p in folder.iterdir() if CHECKPOINT.match(p.name)) if folder.is_dir() else []
    return found[-1] if found else None


def plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as YAML/JSON-safe builtins."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def export_encoders(student: XKD, teacher: XKDTeacher | None, cfg: TrainConfig, out: Path) -> None:
    """Write `export/` (contracts, "Where things live"): `encoders.safetensors` with `student.<modality>.` and
    `teacher.<modality>.` + `Encoder.state_dict()` keys (shared blocks copied under each modality, so each
    encoder loads alone), `model.yaml` (the ModelConfig) and `data.json` (mel normalisation, fps, view geometry)."""
    out.mkdir(parents=True, exist_ok=True)
    # clone: a block stack shared by both encoders (MAS/MATS) must not share storage in the file.
    tensors = {
        f"{role}.{modality}.{key}": value.detach().cpu().clone()
        for role, net in (("student", student), ("teacher", teacher))
        if net is not None
        for modality, encoder in net.encoders().items()
        for key, value in encoder.state_dict().items()
    }
    save_file(tensors, out / "encoders.safetensors", metadata={"run": cfg.name})
    (out / "model.yaml").write_text(yaml.safe_dump(plain(cfg.model), sort_keys=False))
    # The mel statistics actually used, so that evaluation normalises exactly as pretraining did.
    mean, std = mel_stats(cfg.data)
    data = dataclasses.replace(cfg.data, mel_mean=mean, mel_std=std, mel_stats_from_dataset=False)
    (out / "data.json").write_text(json.dumps(plain(data), indent=2) + "\n")


def make_demo_data(shards: Path) -> None:
    """Generate the built-in demo dataset (UCF101 layout) in `<shards>/../raw` and shard it into `shards`."""
    from xkd.sharding import cli, demo  # only this path needs the offline tools

    raw = shards.parent / "raw"
    demo.main(["--out", str(raw)])
    if cli.main(["--src", str(raw), "--out", str(shards), *DEMO_SHARD_ARGS]):
        raise RuntimeError(f"xkd-shard failed on the demo data in {raw}: see its summary above")


def main(cfg: TrainConfig) -> Path:
    """Build everything from `cfg`, train, export; returns the run directory."""
    run_dir = cfg.runs_dir / cfg.name
    # The device as the Accelerator will see it (PartialState alone ignores ACCELERATE_USE_CPU).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    if device.type == "cpu":
        keep_freed_memory()
    if cfg.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        cfg = dataclasses.replace(cfg, precision="bf16" if bf16 else "fp32")
    accelerator = Accelerator(
        mixed_precision="no" if cfg.precision == "fp32" else cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    world = accelerator.num_processes
    micro, rest = divmod(cfg.batch_size, world * cfg.grad_accum_steps)
    if rest or not micro:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not a multiple of {world} processes x grad_accum_steps"
        )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=micro))
    if cfg.make_demo_data and not (Path(cfg.data.shards) / "dataset.json").is_file():
        with accelerator.main_process_first():  # the other ranks wait until the main process has made them
            if accelerator.is_main_process:
                make_demo_data(Path(cfg.data.shards))
    samples = dataset_info(cfg.data.shards)["counts"]["train"]  # contracts, "Schedules"
    if samples < 1:
        raise ValueError(f"{cfg.data.shards}/dataset.json counts no training samples: shard a train split")
    steps_per_epoch = math.ceil(samples / cfg.batch_size)
    set_seed(cfg.seed)  # the same initial students on every rank; teachers start as copies
    student = XKD(cfg.model)
    teacher = XKDTeacher(student).to(accelerator.device) if cfg.model.uses_teacher else None
    optimizer = build_optimizer(student, cfg, fused=accelerator.device.type == "cuda")
    student, optimizer = accelerator.prepare(student, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state, *([teacher] if teacher is not None else []))
    set_seed(cfg.seed, device_specific=True)  # masks differ per rank; a resume restores the saved states
    resume = checkpoint_to_resume(cfg)
    if resume is not None:
        load_checkpoint(accelerator, resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    # TensorBoard under runs/<name>/tb/xkd; the config itself is runs/<name>/config.yaml.
    accelerator.init_trackers("xkd", init_kwargs={"wandb": {"name": cfg.name}})
    raw = fit(accelerator, cfg, student, teacher, optimizer, state, steps_per_epoch)
    if accelerator.is_main_process:
        export_encoders(raw, teacher, cfg, run_dir / "export")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def parse_config(argv: list[str]) -> TrainConfig:
    """`--config FILE` (default `configs/demo.yaml`), then dotted overrides such as `--model.depth 2`."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML preset (default: configs/demo.yaml)")
    parser.add_class_arguments(TrainConfig)
    # `--keep-last 5` and `--keep_last 5` alike (xkd-shard spells its flags with dashes).
    argv = [re.sub(r"^--[^=]+", lambda m: m[0].replace("-", "_").replace("__", "--", 1), a) for a in argv]
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEMO_CONFIG), *argv]
    parsed = parser.instantiate(parser.parse_args(argv))
    return TrainConfig(**{f.name: parsed[f.name] for f in dataclasses.fields(TrainConfig)})


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
