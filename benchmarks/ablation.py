"""The small-scale reproduction of the paper's ablation (Tables 1 and 3, method sheet section 6) on the built-in
demo dataset: MR (both modalities), MR-video, MR+KD, MR+DA, full XKD, XKD with the release's local-view teacher,
XKD-MAS and XKD-MATS, plus the oracle control (true labels in place of the audio teacher's targets), each with
several seeds; video, audio and audio+video linear probes; a Markdown table and a bar plot under `docs/`.

    python benchmarks/ablation.py                                   # every variant, seeds 0 1 2
    python benchmarks/ablation.py --variants mr full --seeds 0 --steps 300
    python benchmarks/ablation.py --mini --variants mr full --seeds 0 --out /tmp/abl.md   # CI-sized

Every run is `train.py` (configs/demo.yaml plus the variant's overrides) followed by `eval.py --probe linear` on
its export. Runs go one by one into `runs/ablation/<variant>-n<steps>-b<batch>-s<seed>/`; a run whose `result.json` exists is skipped,
so a restart continues where it stopped. The schedules (LR, EMA, teacher temperature) are sized to `--steps`, so
every variant sees the same number of optimizer steps; each run's training wall time is recorded for the
equal-wall-clock comparison (`--equal-time [ROW]` adds MR trained for as long as full XKD, or ROW, took).
`--report-only` writes the report from the runs finished so far and names the others, training nothing (an
ablation too long for one sitting is reported as it grows).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # train.py and eval.py are top-level scripts

import eval as xkd_eval  # noqa: E402
import train  # noqa: E402

NO_LOCAL = [f"--{part}.{m}_local_views=0" for part in ("model", "data") for m in ("video", "audio")]
# The paper's MAS/MATS values (model/config.py VARIANT_DEFAULTS), stated in full so that none keeps XKD's.
SHARED = [
    "--model.video_local_views=3", "--data.video_local_views=3",
    "--model.teacher_temp_video_start=0.09", "--model.teacher_temp_video_end=0.11",
    "--model.teacher_temp_audio_start=0.04", "--model.teacher_temp_audio_end=0.06",
]  # fmt: skip


SHARP = tuple(
    f"--model.teacher_temp_{m}_{end}={t}"
    for m in ("video", "audio")
    for end, t in (("start", 0.04), ("end", 0.07))
)
# Teachers at 0.01: the demo's teacher outputs vary across clips by a std of only 0.03-0.06 (diag/teacher_std_*),
# which the paper's 0.07-0.1 turn into near-uniform targets.
COLD = tuple(f"--model.teacher_temp_{m}_{end}=0.01" for m in ("video", "audio") for end in ("start", "end"))


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: what the paper calls it and the train.py overrides on top of the base config."""

    label: str
    overrides: tuple[str, ...]
    teacher: bool
    """Whether the run has an EMA teacher whose backbone is probed too."""


VARIANTS: dict[str, Variant] = {
    "mr": Variant("MR (audio + video)", ("--model.objective=mr", *NO_LOCAL), False),
    "mr_video": Variant("MR, video only", ("--model.objective=mr_video", *NO_LOCAL), False),
    "mr_kd": Variant("MR + KD", ("--model.objective=mr_kd",), True),
    "mr_da": Variant("MR + DA", ("--model.objective=mr_da",), False),
    "full": Variant("XKD (MR + KD + DA)", (), True),
    "full_local": Variant("XKD, local-view teacher (release)", ("--model.teacher_input=local",), True),
    "mas": Variant("XKD-MAS", ("--model.variant=mas", *SHARED), True),
    "mats": Variant("XKD-MATS", ("--model.variant=mats", *SHARED), True),
    "oracle": Variant("oracle: labels as audio targets", ("--model.oracle_targets=true",), True),
    # Demo-scale deviations, on request only: KD weighted like reconstruction (paper: 1 vs 5).
    "full_kd5": Variant("XKD, KD weight 5 (not the paper's 1)", ("--model.kd_coeff=5",), True),
    # DINO's teacher-temperature warmup 0.04 -> 0.07 for both teachers (paper: 0.1 video, 0.07 audio, constant).
    "full_sharp": Variant("XKD, teacher temperatures 0.04 -> 0.07", SHARP, True),
    # Audio -> video distillation only: takes the video teacher's pull on the audio head out.
    "full_a2v": Variant("XKD, audio -> video KD only", ("--model.kd_v2a_weight=0",), True),
    "full_cold": Variant("XKD, teacher temperatures 0.01", COLD, True),
    "full_cold_kd5": Variant(
        "XKD, teacher temperatures 0.01, KD weight 5", (*COLD, "--model.kd_coeff=5"), True
    ),
    # Teacher temperatures that follow the spread of the teacher's outputs: sharp targets without a hand-set value.
    "full_rel": Variant(
        "XKD, spread-relative teacher temperatures", ("--model.teacher_temp_relative=true",), True
    ),
}
DEMO_DEVIATIONS = ("full_kd5", "full_sharp", "full_a2v", "full_cold", "full_cold_kd5", "full_rel")
DEFAULT_VARIANTS = [key for key in VARIANTS if key not in DEMO_DEVIATIONS]
MODALITIES = ("video", "audio", "audio+video")
MARKER = "<!-- Everything below is generated by benchmarks/ablation.py; text above this line is kept. -->"
# Last logged values shown in the table (train.py's diag/*; a2v = audio teacher -> video student).
DIAGNOSTICS = (
    "diag/teacher_entropy_a2v",
    "diag/prototypes_used_a2v",
    "diag/agreement_a2v",
    "diag/prototype_nmi_a2v",
    "diag/student_std_a2v",
)
# The CI-sized run: a narrow 1-block model on the small demo data (4 classes, one shard: one loader worker).
MINI = (
    "--model.embed_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.decoder_dim=32",
    "--model.decoder_heads=2", "--model.head_hidden_dim=64", "--model.head_bottleneck_dim=32",
    "--model.head_out_dim=16", "--data.num_workers=1",
)  # fmt: skip


def make_data(shards: Path, mini: bool) -> None:
    """The demo shards: the default dataset through `train.make_demo_data` (the demo's one recipe), or a small
    one (4 classes x 12 clips: 32 train / 16 test) sharded with the same `train.DEMO_SHARD_ARGS`."""
    if (shards / "dataset.json").is_file():
        return
    if not mini:
        train.make_demo_data(shards)
        return
    from xkd.sharding import cli, demo

    raw = shards.parent / "raw"
    # 4 classes (HBar/VBar x Slow/Fast): two tones, so the audio probe has a class cue even after a few steps.
    demo.main(["--out", str(raw), "--classes", "4", "--clips-per-class", "12", "--workers", "1"])
    if cli.main(["--src", str(raw), "--out", str(shards), *train.DEMO_SHARD_ARGS]):
        raise RuntimeError(f"xkd-shard failed on the mini demo data in {raw}")


def row_overrides(variant: Variant, num_classes: int) -> list[str]:
    """The train.py overrides of a row on the demo data (the oracle needs the number of classes)."""
    oracle = "--model.oracle_targets=true" in variant.overrides
    return [*variant.overrides, *([f"--model.oracle_num_classes={num_classes}"] if oracle else [])]


def train_run(args: argparse.Namespace, name: str, variant: Variant, seed: int, steps: int) -> float:
    """Train one run to `steps` optimizer steps (its schedules sized to them); returns the training wall time in
    seconds (measured once: a restart after training reads it from `train_time.json`)."""
    run_dir = args.runs_dir / name
    timing = run_dir / "train_time.json"
    if timing.is_file() and (run_dir / "export" / "encoders.safetensors").is_file():
        return json.loads(timing.read_text())["seconds"]
    info = json.loads((args.shards / "dataset.json").read_text())
    batch = 8 if args.mini else args.batch_size
    steps_per_epoch = math.ceil(info["counts"]["train"] / batch)
    epochs = steps / steps_per_epoch
    # Warm the LR and the teacher temperature up over the first 20% of the steps (demo.yaml: 1 of 5 epochs).
    warmup = 0.2 * epochs
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--config", str(args.config), f"--name={name}",
        f"--runs_dir={args.runs_dir}", f"--seed={seed}", f"--epochs={epochs}", f"--warmup_epochs={warmup}",
        f"--teacher_temp_warmup_epochs={warmup}", f"--batch_size={batch}", f"--checkpoint_every={steps}",
        f"--log_every={max(1, steps // 20)}", "--make_demo_data=false", f"--data.shards={args.shards}",
        *(MINI if args.mini else ()), *row_overrides(variant, len(info["classes"])),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    timing.write_text(json.dumps({"seconds": seconds, "steps": steps}) + "\n")
    return seconds


def probe(args: argparse.Namespace, run_dir: Path, backbone: str, modality: str, seed: int) -> float:
    """Linear-probe top-1 (%) of one backbone and modality of the run's export (eval.py, default protocol)."""
    argv = [
        f"--export={run_dir / 'export'}", f"--shards={args.shards}", "--probe=linear", f"--backbone={backbone}",
        f"--modality={modality}", f"--results_dir={run_dir / 'eval'}", f"--seed={seed}",
        f"--train_views={args.train_views}", f"--test_clips={args.test_clips}", f"--cache_dir={args.runs_dir / 'cache'}",
    ]  # fmt: skip
    if args.mini:
        argv += ["--cv_folds=2", "--num_workers=1"]
    return float(xkd_eval.main(argv)["mean"]["top1"])


def last_diagnostics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each `DIAGNOSTICS` scalar in the run's TensorBoard log ({} when absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, float] = {}
    for events in sorted((run_dir / "tb").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(acc.Tags()["scalars"]) & set(DIAGNOSTICS):
            found[tag] = acc.Scalars(tag)[-1].value
    return found


def run_name(args: argparse.Namespace, key: str, steps: int, seed: int) -> str:
    """`<variant>-n<steps>-b<batch>-s<seed>`: runs of another length or batch never reuse each other's results."""
    return f"{key}-n{steps}-b{8 if args.mini else args.batch_size}-s{seed}"


def finished(args: argparse.Namespace, name: str) -> dict[str, object] | None:
    """The run's `result.json` (written last, so only by a run that finished), or None."""
    path = args.runs_dir / name / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_one(args: argparse.Namespace, key: str, seed: int, steps: int, name: str) -> dict[str, object]:
    """Train and probe one (variant, seed), or read its finished `result.json`."""
    done = finished(args, name)
    if done is not None:
        return done
    run_dir = args.runs_dir / name
    variant = VARIANTS[key if key in VARIANTS else "mr"]
    print(f"== ablation run {name}: {variant.label}, {steps} steps", file=sys.stderr, flush=True)
    seconds = train_run(args, name, variant, seed, steps)
    modalities = ("video",) if key == "mr_video" else MODALITIES
    backbones = ("student", "teacher") if variant.teacher and args.teacher_probe else ("student",)
    probes = {b: {m: probe(args, run_dir, b, m, seed) for m in modalities} for b in backbones}
    result = {
        "variant": key, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1), "probes": probes,
        "diagnostics": last_diagnostics(run_dir), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def row_runs(args: argparse.Namespace, key: str, steps: int, missing: list[str]) -> list[dict[str, object]]:
    """A row's runs over `--seeds`, trained unless finished; with `--report-only` only the finished ones, the
    names of the others appended to `missing`."""
    runs = []
    for seed in args.seeds:
        name = run_name(args, key, steps, seed)
        result = finished(args, name) if args.report_only else run_one(args, key, seed, steps, name)
        if result is None:
            missing.append(name)
        else:
            runs.append(result)
    return runs


def mean_std(values: list[float]) -> str:
    """`mean ± std` (sample std over seeds; `-` for one seed)."""
    if not values:
        return ""
    std = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.1f} ± {std}"


def table(results: dict[str, list[dict[str, object]]], backbone: str) -> list[str]:
    """Markdown rows: one per variant, the three probes of `backbone`, train time and the final diagnostics."""
    head = "| variant | runs | steps | video | audio | audio+video | train s / run | H(q) a2v | NMI a2v | agreement a2v |"
    rows = [head, "|---" * 10 + "|"]
    for key, runs in results.items():
        runs = [r for r in runs if backbone in r["probes"]]
        if not runs:
            continue
        acc = {m: [r["probes"][backbone][m] for r in runs if m in r["probes"][backbone]] for m in MODALITIES}
        diag = {d: [r["diagnostics"][d] for r in runs if d in r["diagnostics"]] for d in DIAGNOSTICS}
        label = (
            VARIANTS[key].label
            if key in VARIANTS
            else f"MR at the wall-clock of: {VARIANTS[key.removeprefix('mr_at_')].label}"
        )
        cells = [
            label, str(len(runs)), str(runs[0]["steps"]), *(mean_std(acc[m]) for m in MODALITIES),
            f"{statistics.mean(r['train_seconds'] for r in runs):.0f}",
            *(f"{statistics.mean(diag[d]):.2f}" if diag[d] else "" for d in (DIAGNOSTICS[0], DIAGNOSTICS[3], DIAGNOSTICS[2])),
        ]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def plot(results: dict[str, list[dict[str, object]]], path: Path, chance: float) -> None:
    """Grouped bars (video, audio, audio+video student probes) per variant, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) + 2), 4))
    width = 0.8 / len(MODALITIES)
    for i, m in enumerate(MODALITIES):
        values = [
            [r["probes"]["student"][m] for r in results[k] if m in r["probes"]["student"]] for k in keys
        ]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar([x + (i - 1) * width for x in range(len(keys))], means, width, yerr=stds, capsize=3, label=m)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    ax.set_ylabel("linear probe top-1 (%), student backbone")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it (reports are committed)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def write_report(
    args: argparse.Namespace, results: dict[str, list[dict[str, object]]], wall: float, missing: list[str]
) -> None:
    """`--out` (Markdown: command, machine, date, time, tables, the runs not finished) and the bar plot beside it."""
    info = json.loads((args.shards / "dataset.json").read_text())
    chance = 100.0 / len(info["classes"])
    png = args.out.with_suffix(".png")
    plot(results, png, chance)
    import torch

    # Hand-written text above the marker (findings, caveats) survives a regeneration.
    kept = args.out.read_text().split(MARKER)[0] if args.out.is_file() else ""
    lines = [
        kept.rstrip("\n") or "# Demo-scale ablation",
        "",
        MARKER,
        "",
        f"- Command: `python benchmarks/ablation.py {' '.join(sys.argv[1:])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; this invocation's wall time "
        f"{wall / 60:.1f} min (finished runs are reused, so this is not the whole ablation's cost).",
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}.",
        f"- Data: `{shown(args.shards)}` ({info['counts']['train']} train / {info['counts']['samples'] - info['counts']['train']}"
        f" test clips, {len(info['classes'])} classes, chance {chance:.1f}%).",
        f"- Probes: `eval.py --probe linear` (default protocol), {args.train_views} train view(s) per video, "
        f"{args.test_clips} test clip(s); mean ± sample std over seeds.",
        *([f"- Not finished yet, so not in the tables: {', '.join(missing)}."] if missing else []),
        "",
        "## Student backbone (comparable across every variant)",
        "",
        *table(results, "student"),
    ]
    if any("teacher" in r["probes"] for runs in results.values() for r in runs):
        lines += ["", "## EMA teacher backbone (variants with a teacher)", "", *table(results, "teacher")]
    lines += ["", f"![ablation]({png.name})", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def summarize(eval_dir: Path) -> str:
    """One Markdown table of every linear-probe result JSON in `eval_dir` (`make demo`'s last step)."""
    rows = ["| backbone | modality | top-1 (%) | top-5 (%) | test videos |", "|---|---|---|---|---|"]
    found = sorted(eval_dir.glob("*_linear_*.json"))
    if not found:
        raise FileNotFoundError(f"{eval_dir}: no linear-probe results (*_linear_*.json); run eval.py first")
    for path in found:
        r = json.loads(path.read_text())
        n_test = sum(f["n_test"] for f in r["folds"])
        rows.append(
            f"| {r['backbone']} | {r['modality']} | {r['mean']['top1']:.1f} | {r['mean']['top5']:.1f} | {n_test} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
        help=f"rows to run (default: the paper's ablation and the oracle; {', '.join(DEMO_DEVIATIONS)} on request)",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default 32, demo.yaml's)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="base train.py preset")
    p.add_argument("--shards", type=Path, default=None, help="demo shards (default data/demo/shards)")
    p.add_argument("--runs-dir", type=Path, default=None, help="one folder per run (default runs/ablation)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "ablation.md", help="Markdown report (+ .png)")
    p.add_argument("--train-views", type=int, default=1, help="augmented clips per train video in the probe")
    p.add_argument("--test-clips", type=int, default=2, help="clips averaged per test video in the probe")
    p.add_argument("--no-teacher-probe", dest="teacher_probe", action="store_false", help="student only")
    p.add_argument(
        "--equal-time", nargs="?", const="full", default=None, metavar="ROW", choices=list(VARIANTS),
        help="add MR trained for the mean wall time of ROW's runs (default ROW: full, i.e. XKD)",
    )  # fmt: skip
    p.add_argument("--mini", action="store_true", help="4-class x 12-clip demo data, a 1-block model (CI)")
    p.add_argument(
        "--report-only", action="store_true",
        help="train nothing: report the runs already finished and name the missing ones",
    )  # fmt: skip
    p.add_argument("--summarize", type=Path, help="only print the table of the probe results in this folder")
    args = p.parse_args(argv)
    mini_root = ROOT / "data" / "demo-mini"
    args.shards = args.shards or (mini_root / "shards" if args.mini else ROOT / "data" / "demo" / "shards")
    args.runs_dir = args.runs_dir or ROOT / "runs" / ("ablation-mini" if args.mini else "ablation")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    args = parse_args(argv)
    if args.summarize is not None:
        print(summarize(args.summarize))
        return {}
    started = time.perf_counter()
    if args.report_only:
        if not (args.shards / "dataset.json").is_file():
            raise SystemExit(
                f"--report-only: {args.shards / 'dataset.json'} not found; pass the runs' --shards"
            )
    else:
        make_data(args.shards, args.mini)
        args.runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, object]]] = {}
    missing: list[str] = []
    for key in args.variants:
        if runs := row_runs(args, key, args.steps, missing):
            results[key] = runs
    if args.equal_time and "mr" in results and args.equal_time in results:
        # MR given the seconds the row took: steps scaled by the measured per-step time ratio.
        ratio = statistics.mean(r["train_seconds"] for r in results[args.equal_time]) / statistics.mean(
            r["train_seconds"] for r in results["mr"]
        )
        key = f"mr_at_{args.equal_time}"  # the table's label names the row after the prefix
        if runs := row_runs(args, key, round(args.steps * ratio), missing):
            results[key] = runs
    if not results:
        raise SystemExit(f"--report-only: no finished run of these rows and seeds in {args.runs_dir}")
    write_report(args, results, time.perf_counter() - started, missing)
    return results


if __name__ == "__main__":
    main()
