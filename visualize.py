"""Visual diagnostics of a pretraining run, saved as PNG (issue 8): masked-reconstruction samples (input / masked /
reconstruction frames and log-mel spectrograms, method sheet 2.2) and the teachers' cross-modal refinement weights
over a clip (method sheet 2.4).

    python visualize.py --run runs/demo                    # newest checkpoint of the run: both figures
    python visualize.py --export runs/demo/export          # encoders only: refinement weights
    python visualize.py --run runs/demo --clips 2 --out runs/demo/figures --split test

Reconstruction needs the decoders, so it reads a checkpoint (`runs/<name>/checkpoints/step_*`); an export holds
only encoders and gives the refinement figure. Clips come from the run's shards (`data.shards` of its config,
or `--shards`) through the evaluation loader: the centre window of the first `--clips` videos of `--split`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from xkd.model import XKD, ModelConfig, XKDTeacher
from xkd.model.heads import refinement_weights
from xkd.model.layers import patchify, unpatchify
from xkd.pipeline import Batch, DataConfig, make_eval_loader
from xkd.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_GLOB = "step_*"


def model_config(raw: dict) -> ModelConfig:
    """ModelConfig from its YAML dict (tuples were written as lists)."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(
        **{
            k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
            for k, v in raw.items()
        }
    )


def data_config(raw: dict, shards: Path | None, clips: int) -> DataConfig:
    """The run's DataConfig with the visualisation's shards and batch size."""
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    kept = {
        k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v for k, v in raw.items()
    }
    if shards is not None:
        kept["shards"] = str(shards)
    return DataConfig(**{**kept, "batch_size": clips, "num_workers": 0})


def latest_checkpoint(run: Path) -> Path:
    found = sorted((run / "checkpoints").glob(CHECKPOINT_GLOB))
    found = [p for p in found if not p.name.endswith(".tmp") and (p / "model.safetensors").is_file()]
    if not found:
        raise FileNotFoundError(f"{run}/checkpoints has no step_* checkpoint: train the run first (train.py)")
    return found[-1]


def load_run(run: Path) -> tuple[XKD, XKDTeacher | None, dict]:
    """Student (with decoders) and teacher of the run's newest checkpoint, and the run's config dict."""
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a train.py run directory")
    cfg = yaml.safe_load(cfg_path.read_text())
    student = XKD(model_config(cfg["model"]))
    ckpt = latest_checkpoint(run)
    student.load_state_dict(load_file(ckpt / "model.safetensors"))
    teacher = None
    if student.cfg.uses_teacher:
        teacher = XKDTeacher(student)
        # train.py registers (TrainState, teacher) for checkpointing; Accelerate writes each state_dict as
        # custom_checkpoint_<i>.pkl: the teacher's is the one holding the KD centers.
        states = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("custom_checkpoint_*.pkl"))]
        found = [s for s in states if "center_video" in s]
        if not found:
            raise FileNotFoundError(f"{ckpt}: no teacher state (custom_checkpoint_*.pkl with the KD centers)")
        teacher.load_state_dict(found[0])
    return student.eval(), teacher.eval() if teacher is not None else None, cfg


def load_export(export: Path) -> tuple[XKD, dict]:
    """A model whose encoders carry the export's teacher weights (the student's when it has no teacher)."""
    cfg = {"model": yaml.safe_load((export / "model.yaml").read_text())}
    cfg["data"] = json.loads((export / "data.json").read_text())
    net = XKD(model_config(cfg["model"]))
    tensors = load_file(export / "encoders.safetensors")
    role = "teacher" if any(k.startswith("teacher.") for k in tensors) else "student"
    for m, encoder in net.encoders().items():
        prefix = f"{role}.{m}."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return net.eval(), cfg


def to_image(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) ImageNet-normalised -> (T, H, W, C) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1, 1)
    return (video.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def reconstruct(student: XKD, x: torch.Tensor, modality: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction) of `x` (B, C, *S): masked patches zeroed; the reconstruction pastes the
    decoder's masked patches (de-normalised with each target patch's own mean and std when `norm_pix_loss`)
    into the visible input, as MAE's figures do."""
    cfg, patch = student.cfg, student.cfg.patch(modality)
    torch.manual_seed(seed)
    latent, mask, ids_restore = student.encoders()[modality].forward_masked(x, cfg.mask_ratio(modality))
    pred = student.decoder[modality](latent, ids_restore).float()
    target = patchify(x.float(), patch)
    if cfg.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    keep = (1 - mask).unsqueeze(-1)
    grid, chans = tuple(s // p for s, p in zip(x.shape[2:], patch)), x.shape[1]
    masked = unpatchify(target * keep, patch, grid, chans)
    recon = unpatchify(target * keep + pred * (1 - keep), patch, grid, chans)
    return masked, recon


def plot_reconstruction(student: XKD, batch: Batch, out: Path, frames: int = 4) -> Path:
    """One row per clip and stream: input / masked / reconstruction, `frames` video frames and the spectrogram."""
    import matplotlib.pyplot as plt

    modalities = student.cfg.modalities
    x = {"video": batch.video_global, "audio": batch.audio_global}
    results = {m: reconstruct(student, x[m], m, seed=0) for m in modalities}
    clips = batch.video_global.shape[0]
    t_total = batch.video_global.shape[2]
    picks = np.linspace(0, t_total - 1, frames).round().astype(int)
    columns = frames * 3 + (3 if "audio" in modalities else 0)
    fig, axes = plt.subplots(clips, columns, figsize=(1.3 * columns, 1.5 * clips), squeeze=False)
    for i in range(clips):
        masked, recon = results["video"]
        panels = [
            ("input", to_image(x["video"][i])),
            ("masked", to_image(masked[i])),
            ("recon", to_image(recon[i])),
        ]
        for j, (name, video) in enumerate(panels):
            for k, t in enumerate(picks):
                ax = axes[i, j * frames + k]
                ax.imshow(video[t])
                ax.set_title(f"{name} t={t}", fontsize=6)
        if "audio" in modalities:
            masked_a, recon_a = results["audio"]
            for j, (name, spec) in enumerate((("mel", x["audio"]), ("masked", masked_a), ("recon", recon_a))):
                ax = axes[i, frames * 3 + j]
                ax.imshow(spec[i, 0].float().cpu().numpy(), origin="lower", aspect="auto", cmap="magma")
                ax.set_title(f"{name} log-mel", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"masked reconstruction, labels {batch.label.tolist()}", fontsize=8)
    fig.tight_layout()
    path = out / "reconstruction.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_refinement(net: XKD | XKDTeacher, batch: Batch, out: Path) -> Path:
    """The cross-modal refinement weights (method sheet 2.4) of the video tokens, per frame-group, over the clip
    (overlaid on the middle frame of each tubelet) and of the audio tokens over the spectrogram."""
    import matplotlib.pyplot as plt

    cfg = net.cfg
    encoders = net.encoders()
    (_, attn_v), (_, attn_a) = (
        encoders[m].forward_with_attention(x)
        for m, x in (("video", batch.video_global), ("audio", batch.audio_global))
    )
    w_v, w_a = refinement_weights(attn_v, attn_a, cfg.refine_mode)
    grid_v = encoders["video"].token_grid(batch.video_global.shape)
    grid_a = encoders["audio"].token_grid(batch.audio_global.shape)
    clips, steps = batch.video_global.shape[0], grid_v[0]
    fig, axes = plt.subplots(clips, steps + 1, figsize=(1.4 * (steps + 1), 1.6 * clips), squeeze=False)
    pt = cfg.patch("video")[0]
    for i in range(clips):
        frames = to_image(batch.video_global[i])
        weights = w_v[i].reshape(grid_v).float().cpu().numpy()
        for s in range(steps):
            ax = axes[i, s]
            h, w = frames.shape[1:3]
            ax.imshow(frames[s * pt + pt // 2])
            ax.imshow(weights[s], cmap="inferno", alpha=0.55, extent=(0, w, h, 0), vmin=0, vmax=weights.max())
            ax.set_title(f"frames {s * pt}-{s * pt + pt - 1}", fontsize=6)
        ax = axes[i, steps]
        ax.imshow(batch.audio_global[i, 0].float().cpu().numpy(), origin="lower", aspect="auto", cmap="gray")
        wa = w_a[i].reshape(grid_a).float().cpu().numpy()
        f, t = batch.audio_global.shape[2:]
        ax.imshow(wa, origin="lower", aspect="auto", cmap="inferno", alpha=0.55, extent=(0, t, 0, f))
        ax.set_title("audio tokens", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"teacher refinement weights (mode {cfg.refine_mode}), labels {batch.label.tolist()}", fontsize=8
    )
    fig.tight_layout()
    path = out / "refinement.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="visualize.py", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="train.py run directory (its newest checkpoint)")
    source.add_argument("--export", type=Path, help="export directory (encoders only: refinement weights)")
    p.add_argument("--shards", type=Path, help="shards to draw clips from (default: the run's data.shards)")
    p.add_argument("--split", default="test", help="split of the shards (default test)")
    p.add_argument("--clips", type=int, default=3, help="clips to show (default 3)")
    p.add_argument("--out", type=Path, help="output folder (default: <run or export>/figures)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.run is not None:
        student, teacher, cfg = load_run(args.run)
        refiner: XKD | XKDTeacher | None = teacher
    else:
        student, cfg = load_export(args.export)
        refiner = student
    out = args.out or (args.run or args.export) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    data = data_config(cfg["data"], args.shards, args.clips)
    batch = next(iter(make_eval_loader(data, split=args.split, clips=1)))
    written = []
    if args.run is not None:
        written.append(plot_reconstruction(student, batch, out))
    if refiner is not None and student.cfg.refine and set(student.cfg.modalities) == {"video", "audio"}:
        written.append(plot_refinement(refiner, batch, out))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"visualize.py: error: {err}")
