"""Can the demo's video student learn the demo's class cue at all? A supervised check of the ViT geometry (issue 8).

Cross-modal distillation can only teach the video student what its encoder, fed the way XKD feeds it, can learn
from labels in the same number of steps. XKD's student sees the *masked* global view (method sheet 2.3: the
pooled visible tokens of the masked pass), so this script trains the video `Encoder` of a train.py preset
(default configs/demo.yaml) with a linear classifier on the true labels, from the pooled visible tokens at each
mask ratio asked for, and reports the test accuracy of the unmasked encoder (as the probes see it).

Clips come from the demo shards through `xkd.pipeline` (evaluation views: `--train-clips` evenly spaced
windows per training video, one centre clip per test video), decoded once and kept in memory, so the check
measures the model, not the loader; training adds random horizontal flips. AdamW, linear warmup then cosine.

Usage: `python benchmarks/video_student.py [--config configs/demo.yaml] [--mask-ratios 0 0.5 0.85] [--steps 1500]
[--lr 1e-3] [--out docs/benchmarks/video-student.md]` (demo shards: run `make demo` or train.py once first).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # train.py is a top-level script

import train  # noqa: E402
from xkd.model.config import keep_count  # noqa: E402
from xkd.model.encoder import build_encoder  # noqa: E402
from xkd.model.heads import mean_patch_tokens  # noqa: E402
from xkd.pipeline import make_eval_loader  # noqa: E402


def load_clips(cfg: train.TrainConfig, split: str, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every `split` video of fold 1 as `clips` evenly spaced global views: (N, 3, T, H, W) float16, labels (N,)."""
    data = dataclasses.replace(cfg.data, with_audio=False, batch_size=64)
    videos, labels = [], []
    for batch in make_eval_loader(data, split=split, fold=1, clips=clips):
        videos.append(batch.video_global.half())
        labels.append(batch.label)
    return torch.cat(videos), torch.cat(labels)


def train_and_test(
    cfg: train.TrainConfig,
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]],
    mask: float,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """Supervised training from the visible tokens at `mask`; returns (test top-1 %, seconds)."""
    torch.manual_seed(args.seed)
    encoder = build_encoder(cfg.model, "video")
    classes = int(clips["train"][1].max()) + 1
    classifier = nn.Linear(encoder.embed_dim, classes)
    params = [*encoder.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    x_train, y_train = clips["train"]
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 15)
    started = time.perf_counter()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        index = torch.randint(0, len(y_train), (args.batch_size,), generator=generator)
        x = x_train[index].float()
        flip = torch.rand(len(index), generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        if mask > 0:
            pooled = mean_patch_tokens(encoder.forward_masked(x, mask)[0])  # the student's global embedding
        else:
            pooled = encoder.forward_features(x)
        loss = F.cross_entropy(classifier(pooled), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.eval()
    x_test, y_test = clips["test"]
    with torch.no_grad():
        logits = torch.cat(
            [
                classifier(encoder.forward_features(x_test[i : i + 128].float()))
                for i in range(0, len(x_test), 128)
            ]
        )
    return 100 * (logits.argmax(1) == y_test).float().mean().item(), time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="train.py preset")
    p.add_argument("--shards", type=Path, default=None, help="demo shards (default: the preset's)")
    p.add_argument("--mask-ratios", nargs="+", type=float, default=[0.0, 0.5, 0.85])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-clips", type=int, default=2, help="windows per training video kept in memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "video-student.md")
    args = p.parse_args(argv)
    overrides = [f"--data.shards={args.shards}"] if args.shards else []
    cfg = train.parse_config(["--config", str(args.config), "--make_demo_data=false", *overrides])
    clips = {"train": load_clips(cfg, "train", args.train_clips), "test": load_clips(cfg, "test", 1)}
    shape = tuple(clips["train"][0].shape[1:])
    chance = 100 / (int(clips["train"][1].max()) + 1)
    rows, tokens = [], cfg.model.video_tokens
    for mask in args.mask_ratios:
        accuracy, seconds = train_and_test(cfg, clips, mask, args)
        rows.append(f"| {mask:g} | {keep_count(tokens, mask)} of {tokens} | {accuracy:.1f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    lines = [
        "# Can the demo's video student learn the cue? (supervised check)",
        "",
        f"Generated by `{shlex.join(['python', 'benchmarks/video_student.py', *(argv or sys.argv[1:])])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        "machine shared with other jobs, so times are upper bounds).",
        "",
        f"Video encoder of `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`, "
        f"clips {shape} (C, T, H, W); {len(clips['train'][1])} training clips ({args.train_clips} per video), "
        f"{len(clips['test'][1])} test videos (fold 1); {args.steps} steps, batch {args.batch_size}, AdamW lr "
        f"{args.lr:g}, warmup then cosine; trained on the pooled *visible* tokens (as XKD's student embedding), "
        f"tested unmasked. Chance {chance:.0f}%.",
        "",
        "| mask ratio in training | tokens seen | test top-1 % | seconds |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
