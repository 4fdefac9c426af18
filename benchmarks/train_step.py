"""Train-step benchmark of XKD (issue 9): samples/s, step-time breakdown, peak memory and MFU of `train.train_step`.

Runs the real training step of `train.py` (method sheet 2.8: teachers, students, backward, clipping, AdamW, EMA) on
a given size and geometry (default: the paper's ViT-B XKD, per-GPU batch 32) over a matrix of implementation
choices, each in a fresh process so that precision, allocator state and compiled graphs never leak between cells:

| cell | attention | precision | clipping, EMA, AdamW |
| --- | --- | --- | --- |
| `sdpa-bf16` | SDPA (flash) | bf16 autocast | train.py: foreach per-parameter clip, foreach EMA, fused AdamW |
| `explicit-bf16` | softmax(QK^T)V | bf16 autocast | as above |
| `authors-fp16` | softmax(QK^T)V | fp16 autocast + GradScaler | the release: Python loop over parameters with a host sync each (DINO `clip_gradients`), Python-loop EMA, for-loop AdamW |
| `compile` | the fastest bf16 cell above, student and teacher under `torch.compile` | | |

so the speed-up over the authors' choices is a ratio from one run. Batches are synthetic tensors already on the
device (the loader benchmark measures data separately), or with `--loader` real batches from `xkd.pipeline`, in
which case the host time spent waiting for the next batch is reported too. Phases are timed with CUDA events at
hooks on the teacher and student forwards, `accelerator.backward`, `optimizer.step` and `teacher.update`, so the
step itself runs unmodified; warm-up steps are excluded. MFU = `flops_per_sample` x samples/s over three
ceilings: a bf16 matmul measured in this run, the 790 TFLOP/s measured on the project's H100/H200 (`TrainConfig`),
and the datasheet dense bf16 peak of the detected device.

    python -m benchmarks.train_step                                   # base, batch 32, all cells (CUDA)
    python -m benchmarks.train_step --max-batch search                # + rows at the largest batch that fits
    python -m benchmarks.train_step --loader --shards DIR --cells sdpa-bf16 --backend dali
    python -m benchmarks.train_step --size tiny --device cpu --steps 3  # CPU smoke run (tests)

Writes a Markdown table to `--out` (default `docs/benchmarks/train_step.md`) and the full numbers as JSON beside it.
Run it from the repository root (`train.py` is a script there, not part of the installed package).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import torch
import yaml
from torch import nn

try:
    import train
except ModuleNotFoundError as err:  # train.py sits at the repository root, outside the installed package
    raise SystemExit(
        "benchmarks/train_step.py: cannot import train.py; run from the repository root as "
        "`python -m benchmarks.train_step`"
    ) from err
from accelerate import Accelerator

from xkd.model import XKD, ModelConfig, XKDTeacher, flops_breakdown, flops_per_sample
from xkd.pipeline import DataConfig, make_train_loader
from xkd.pipeline.batch import Batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "train_step.md"
# The schedules only need a plausible epoch length: Kinetics-400 (~230k clips) at the paper's global batch 256.
STEPS_PER_EPOCH = 900
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name in this order (the SXM parts are named plainly, e.g. "NVIDIA H100 80GB HBM3").
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "H200 NVL"),
    ("H200", 989.4, "H200 SXM"),
    ("H100 NVL", 835.5, "H100 NVL"),
    ("H100 PCIe", 756.5, "H100 PCIe"),
    ("H100", 989.4, "H100 SXM"),
    ("A100", 312.0, "A100"),
)
PHASES = ("teacher_fwd", "student_fwd", "backward", "clip", "adamw", "ema")


@dataclass(frozen=True)
class Cell:
    """One implementation choice of the matrix (see the module docstring)."""

    name: str
    attention: str
    precision: str
    release: bool
    """The authors' released choices for clipping, EMA and AdamW instead of train.py's."""


CELLS = {
    c.name: c
    for c in (
        Cell("sdpa-bf16", "sdpa", "bf16", False),
        Cell("explicit-bf16", "explicit", "bf16", False),
        Cell("authors-fp16", "explicit", "fp16", True),
    )
}
COMPILE = "compile"
BASELINE = "authors-fp16"


# ---- the authors' released choices (baseline only; train.py uses foreach versions of both) ----
def release_clip_gradients(parameters: list[nn.Parameter], clip: float) -> None:
    """Per-parameter L2 clipping as the release does it (DINO `utils.clip_gradients`, method sheet 4): one norm per
    tensor and a Python `if` on it, i.e. one host-device sync per parameter."""
    for p in parameters:
        if p.grad is not None:
            clip_coef = clip / (p.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)


@torch.no_grad()
def release_ema_update(teacher: XKDTeacher, student: XKD, momentum: float) -> None:
    """The release's EMA (DINO `main_dino.py`): a Python loop over (student, teacher) parameter pairs, encoders and
    heads, with a temporary per parameter."""
    for part in ("encoder", "head"):
        for m in student.cfg.modalities:
            for p_s, p_t in zip(
                getattr(student, part)[m].parameters(), getattr(teacher, part)[m].parameters()
            ):
                p_t.mul_(momentum).add_((1 - momentum) * p_s.detach())


# ---- timing ----
class Probe:
    """Timestamps at phase boundaries: CUDA events on a GPU (no sync while the steps run), host clocks on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, Any]] = []

    def new_step(self) -> None:
        self.steps.append({})

    def mark(self, name: str) -> None:
        if not self.steps:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.steps[-1][name] = event
        else:
            self.steps[-1][name] = time.perf_counter()

    def _ms(self, marks: dict[str, Any], start: str, end: str) -> float:
        if start not in marks or end not in marks:
            return 0.0
        a, b = marks[start], marks[end]
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def phases(self, skip: int) -> list[dict[str, float]]:
        """Per-step milliseconds of each phase (after `skip` warm-up steps); call after a synchronize."""
        spans = {
            "teacher_fwd": ("teacher_start", "teacher_end"),
            "student_fwd": ("student_start", "student_end"),
            "backward": ("backward_start", "backward_end"),
            # finite check, unscale, grad-norm metric and clipping: everything between backward and AdamW
            "clip": ("backward_end", "clip_end"),
            "adamw": ("clip_end", "step_end"),
            "ema": ("ema_start", "ema_end"),
            "total": ("begin", "end"),
        }
        out = []
        for marks in self.steps[skip:]:
            row = {k: self._ms(marks, *span) for k, span in spans.items()}
            row["other"] = row["total"] - sum(row[p] for p in PHASES)
            out.append(row)
        return out


def instrument(
    probe: Probe,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: Any,
    raw_student: XKD,
    cell: Cell,
    grad_clip: float,
) -> None:
    """Put the probe's marks around the parts of `train.train_step` (hooks and wrappers on our own objects only),
    and swap in the release's clipping and EMA for the baseline cell."""

    def hooks(module: nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: probe.mark(f"{name}_start"))
        module.register_forward_hook(lambda *_: probe.mark(f"{name}_end"))

    hooks(student, "student")
    backward = accelerator.backward

    def timed_backward(loss: torch.Tensor, **kwargs: Any) -> None:
        probe.mark("backward_start")
        backward(loss, **kwargs)
        probe.mark("backward_end")

    accelerator.backward = timed_backward
    clipped = [
        p for m in (*raw_student.encoders().values(), *raw_student.heads().values()) for p in m.parameters()
    ]
    step = optimizer.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        # train_step has unscaled the gradients by now, as the release does before its clipping loop.
        if cell.release:
            release_clip_gradients(clipped, grad_clip)
        probe.mark("clip_end")
        result = step(*args, **kwargs)
        probe.mark("step_end")
        return result

    optimizer.step = timed_step
    if teacher is None:
        return
    hooks(teacher, "teacher")
    update = teacher.update

    def timed_update(student_module: XKD, momentum: float) -> None:
        probe.mark("ema_start")
        if cell.release:
            release_ema_update(teacher, student_module, momentum)
        else:
            update(student_module, momentum)
        probe.mark("ema_end")

    teacher.update = timed_update


# ---- one cell, in a worker process ----
def data_config(cfg: ModelConfig, **overrides: Any) -> DataConfig:
    """A DataConfig cutting the views `cfg` is built for (the geometry pairs train.py checks)."""
    return DataConfig(**{d: getattr(cfg, m) for m, d in train.SHARED_GEOMETRY}, **overrides)


def synthetic_batch(cfg: ModelConfig, batch: int, device: torch.device) -> Batch:
    """Random views of the right shapes, already on the device (random, not zeros: METHOD.md)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    has_audio = "audio" in cfg.modalities
    v_local, a_local = cfg.video_local_views, cfg.audio_local_views
    return Batch(
        video_global=randn(batch, cfg.video_channels, cfg.video_frames, cfg.video_size, cfg.video_size),
        video_local=randn(
            v_local,
            batch,
            cfg.video_channels,
            cfg.video_local_frames,
            cfg.video_local_size,
            cfg.video_local_size,
        )
        if v_local
        else None,
        audio_global=randn(batch, 1, cfg.audio_mels, cfg.audio_frames) if has_audio else None,
        audio_local=randn(a_local, batch, 1, cfg.audio_mels, cfg.audio_local_frames)
        if has_audio and a_local
        else None,
        label=torch.full((batch,), -1, dtype=torch.long, device=device),
        key=[f"synthetic{i}" for i in range(batch)],
        start_s=torch.zeros(batch, device=device),
        clip_index=torch.zeros(batch, dtype=torch.long, device=device),
    )


class Bench:
    """Everything one cell needs: model, teacher, optimizer and accelerator built as train.main builds them."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cell = CELLS[spec["cell"]]
        self.device = torch.device(spec["device"])
        self.cfg = ModelConfig.from_name(spec["size"], attention=self.cell.attention, **spec["overrides"])
        self.tcfg = train.TrainConfig(
            name="bench",
            model=self.cfg,
            data=data_config(self.cfg),
            batch_size=spec["batch"],
            precision=self.cell.precision,
            # the baseline clips in the optimizer wrapper (release loop), so train.py must not clip as well
            grad_clip_mode="none" if self.cell.release else "per_param",
            trackers=[],
        )
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision=self.cell.precision)
        torch.manual_seed(0)
        with self.device:  # build on the device: init speed is not what is measured
            student = XKD(self.cfg)
            self.teacher = XKDTeacher(student) if self.cfg.uses_teacher else None
        fused = self.device.type == "cuda" and not self.cell.release
        optimizer = train.build_optimizer(student, self.tcfg, fused=fused)
        if self.cell.release:  # the release's torch 1.7 AdamW looped over parameters
            for group in optimizer.param_groups:
                group["foreach"] = False
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.raw = self.accelerator.unwrap_model(self.student)
        self.run_student, self.run_teacher = self.student, self.teacher
        if spec["compile"]:
            backend = spec["compile_backend"]
            self.run_student = torch.compile(self.student, backend=backend)
            if self.teacher is not None:
                self.run_teacher = torch.compile(self.teacher, backend=backend)
        self.probe = Probe(self.device)
        self.skipped = 0
        instrument(
            self.probe,
            self.accelerator,
            self.run_student,
            self.run_teacher,
            self.optimizer,
            self.raw,
            self.cell,
            self.tcfg.grad_clip,
        )

    def step(self, batch: Batch, index: int) -> None:
        temp_video, temp_audio = train.teacher_temp_at(self.tcfg, index, STEPS_PER_EPOCH)
        sched = {
            "sched/lr": train.lr_at(self.tcfg, index, STEPS_PER_EPOCH),
            "sched/ema": train.ema_momentum_at(self.tcfg, index, STEPS_PER_EPOCH),
            "sched/temp_video": temp_video,
            "sched/temp_audio": temp_audio,
        }
        self.probe.new_step()
        self.probe.mark("begin")
        train.train_step(
            self.accelerator,
            self.run_student,
            self.raw,
            self.run_teacher,
            self.optimizer,
            [batch],
            sched,
            self.tcfg,
        )
        self.probe.mark("end")
        # fp16: the GradScaler skips the update of a step with inf/NaN gradients (cheaper, so worth counting)
        self.skipped += bool(getattr(self.optimizer, "step_was_skipped", False))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def batches(bench: Bench, batch: int) -> Iterator[tuple[Batch, float]]:
    """(batch, host seconds spent waiting for it): one synthetic batch forever, or the real training loader."""
    spec = bench.spec
    if not spec["loader"]:
        fixed = synthetic_batch(bench.cfg, batch, bench.device)
        while True:
            yield fixed, 0.0
    data = data_config(
        bench.cfg,
        shards=spec["shards"],
        batch_size=batch,
        backend=spec["backend"],
        dali_device=spec["dali_device"],
        num_workers=spec["num_workers"],
        dali_threads=spec["dali_threads"],
    )
    loader = make_train_loader(data, rank=0, world_size=1, seed=0, step=0)
    while True:
        start = time.perf_counter()  # as train.fit measures its data wait
        item = next(loader).to(bench.device)
        yield item, time.perf_counter() - start


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time `steps` train steps of one cell; returns the row."""
    bench = Bench(spec)
    device = bench.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source = batches(bench, spec["batch"])
    for i in range(spec["warmup"]):
        batch, _ = next(source)
        bench.step(batch, i)
    bench.sync()
    skipped_in_warmup = bench.skipped
    waits = []
    start = time.perf_counter()
    for i in range(spec["steps"]):
        batch, wait = next(source)
        waits.append(wait)
        bench.step(batch, spec["warmup"] + i)
    bench.sync()
    wall = time.perf_counter() - start
    phases = bench.probe.phases(skip=spec["warmup"])
    row: dict[str, Any] = {
        "status": "ok",
        "samples_per_s": spec["steps"] * spec["batch"] / wall,
        "step_ms": 1e3 * wall / spec["steps"],
        "phases_ms": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "data_wait_ms": 1e3 * statistics.median(waits),
        "data_wait_frac": sum(waits) / wall,
        "precision": bench.accelerator.mixed_precision,
        "grad_scaler": bench.accelerator.scaler is not None,
        "skipped_updates": bench.skipped - skipped_in_warmup,
    }
    if spec["compile"]:  # few graphs and no breaks, or the compiled row measures Python fallbacks
        stats = torch._dynamo.utils.counters
        row["graphs"] = stats["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(stats["graph_break"].values())
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        row["device_used_gib"] = (total - free) / 2**30  # includes DALI's own allocations in loader mode
    return row


def largest_batch(fits: Callable[[int], bool], start: int, cap: int, granule: int = 8) -> int:
    """Largest batch for which `fits` holds: double from `start` until it fails, then bisect between the last
    success and the first failure down to `granule`. Doubling stops at `cap` (the result is then the last doubled
    batch, a lower bound); 0 if `start` itself does not fit."""
    good, bad = 0, start
    while fits(bad):
        good = bad
        if 2 * bad > cap:
            return good
        bad *= 2
    while good and bad - good > granule:
        mid = (good + bad) // (2 * granule) * granule
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def search_max_batch(spec: dict[str, Any]) -> dict[str, Any]:
    """`largest_batch` of one cell, a trial being two train steps on synthetic data.

    One model and optimizer serve every trial (their memory does not depend on the batch); after an OOM the
    activations are released and the allocator cache emptied before the next trial."""
    bench = Bench({**spec, "loader": False})
    trials: list[tuple[int, bool]] = []

    def fits(batch: int) -> bool:
        ok = True
        try:
            data = synthetic_batch(bench.cfg, batch, bench.device)
            for i in range(2):
                bench.step(data, i)
            bench.sync()
        except torch.OutOfMemoryError:
            ok = False
        bench.optimizer.zero_grad(set_to_none=True)
        data = None
        gc.collect()
        torch.cuda.empty_cache()
        trials.append((batch, ok))
        print(f"max-batch search: batch {batch}: {'fits' if ok else 'OOM'}", file=sys.stderr, flush=True)
        return ok

    largest = largest_batch(fits, spec["batch"], spec["max_batch_cap"])
    return {"status": "ok", "largest": largest, "trials": trials, "cap": spec["max_batch_cap"]}


def matmul_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """bf16 matmul FLOP/s on random inputs (METHOD.md): median of timed n x n x n products after warm-up, rotating
    three input pairs so no product reads what the previous one left in L2."""
    device, n = torch.device(spec["device"]), spec["ceiling_size"]
    pairs = [
        (
            torch.randn(n, n, device=device, dtype=torch.bfloat16),
            torch.randn(n, n, device=device, dtype=torch.bfloat16),
        )
        for _ in range(3)
    ]
    times = []
    for i in range(spec["ceiling_warmup"] + spec["ceiling_reps"]):
        a, b = pairs[i % 3]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= spec["ceiling_warmup"]:
            times.append(seconds)
    return {"status": "ok", "size": n, "tflops": 2 * n**3 / statistics.median(times) / 1e12}


def probe_device(spec: dict[str, Any]) -> dict[str, Any]:
    """Facts of the device (read in a worker, so the driver process never holds a CUDA context while the cells
    run) and, unless `ceiling_size` is 0, its bf16 matmul ceiling."""
    device = torch.device(spec["device"])
    facts: dict[str, Any] = {"device": f"CPU ({platform.processor() or platform.machine()})"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts = {
            "device": props.name,
            "device_memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "driver": nvidia_smi("driver_version"),
        }
    ceiling = matmul_ceiling(spec) if spec["ceiling_size"] else {"status": "skipped"}
    return {"status": "ok", "device": facts, "ceiling": ceiling}


def nvidia_smi(query: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "measure": measure,
    "max_batch": search_max_batch,
    "probe": probe_device,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = WORKERS[spec["kind"]](spec)
    except torch.OutOfMemoryError as err:
        result = {"status": "oom", "error": str(err).splitlines()[0]}
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its stderr passes through as the log."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", json.dumps(spec)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no result after {timeout_s:.0f} s"}
        result_path = Path(spec["result"])
        if done.returncode or not result_path.is_file():
            return {"status": "error", "error": f"worker exited with {done.returncode} (see the log above)"}
        result = json.loads(result_path.read_text())
    result["worker_s"] = time.perf_counter() - start
    return result


# ---- driver ----
def environment() -> dict[str, Any]:
    """Versions and revision (the device's facts come from the probe worker)."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "accelerate": accelerate.__version__,
        "host": platform.node(),
        "git": None,
    }
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        env["git"] = done.stdout.strip() or None
    except OSError:  # no git on the GPU machine: gpu_suite.py records the revision it is given
        pass
    return env


def datasheet_peak(device_name: str) -> tuple[float | None, str | None]:
    for key, tflops, label in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops, label
    return None, None


def add_mfu(row: dict[str, Any], flops: float, ceilings: dict[str, float | None]) -> None:
    if row.get("status") != "ok":
        return
    achieved = flops * row["samples_per_s"]
    row["tflops"] = achieved / 1e12
    for name, tflops in ceilings.items():
        row[f"mfu_{name}"] = achieved / (tflops * 1e12) if tflops else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    env, ceil = report["environment"], report["ceilings"]
    lines = [
        "# XKD train-step benchmark",
        "",
        f"Written by `benchmarks/train_step.py` on {env['date']}: {env['device']}, torch {env['torch']} "
        f"(CUDA {env['cuda']}, cuDNN {env['cudnn']}), accelerate {env['accelerate']}, Python {env['python']}"
        + (f", driver {env['driver']}" if env.get("driver") else "")
        + (f", revision {env['git']}" if env.get("git") else "")
        + ".",
        "",
        f"Model: `{report['size']}` {report['overrides'] or ''} ({report['gflops_per_sample']:.4g} GFLOP per "
        f"training sample, `flops_per_sample`); {report['steps']} timed steps after {report['warmup']} warm-up "
        "step(s) unless a row's JSON says otherwise; phases are medians over the timed steps (ms), samples/s from "
        "the wall clock over all of them.",
        "",
        "MFU ceilings (dense bf16 TFLOP/s): measured here "
        f"{fmt(ceil['measured'])} ({report['ceiling'].get('size', '-')}^3 matmul), project reference "
        f"{fmt(ceil['reference'])} (TrainConfig.mfu_ceiling_flops), datasheet {fmt(ceil['datasheet'])} "
        f"({report['datasheet_part'] or 'unknown part'}).",
        "",
        "| cell | batch | data | samples/s | step ms | teacher fwd | student fwd | backward | clip | AdamW | EMA "
        "| other | data wait | peak GiB | TFLOP/s | MFU measured | MFU reference | MFU datasheet | x authors |",
        "|" + " --- |" * 19,
    ]
    for row in report["rows"]:
        head = f"| {row['cell']} | {row['batch']} | {row['data']} |"
        if row.get("status") != "ok":
            lines.append(head + f" {row['status']}: {row.get('error', '')} |" + " |" * 15)
            continue
        p = row["phases_ms"]
        wait = (
            f"{row['data_wait_ms']:.1f} ms ({100 * row['data_wait_frac']:.0f}%)"
            if row["data"] != "synthetic"
            else "-"
        )
        mfu = [
            fmt(None if row[f"mfu_{k}"] is None else 100 * row[f"mfu_{k}"])
            for k in ("measured", "reference", "datasheet")
        ]
        lines.append(
            head
            + f" {row['samples_per_s']:.1f} | {row['step_ms']:.1f} | "
            + " | ".join(f"{p[k]:.1f}" for k in (*PHASES, "other"))
            + f" | {wait} | {fmt(row.get('peak_allocated_gib'))} | {row['tflops']:.0f} | "
            + " | ".join(f"{m}%" if m != "-" else m for m in mfu)
            + f" | {fmt(row.get('speedup_vs_authors'), '.2f')} |"
        )
    for row in report["rows"]:
        if row.get("skipped_updates"):
            lines += [
                "",
                f"{row['cell']} at batch {row['batch']}: the GradScaler skipped {row['skipped_updates']} of the timed updates.",
            ]
        if "graphs" in row:
            lines += [
                "",
                f"{row['cell']} at batch {row['batch']}: {row['graphs']} compiled graph(s), {row['graph_breaks']} graph break(s).",
            ]
    if report.get("max_batch"):
        mb = report["max_batch"]
        trials = ", ".join(f"{b} {'ok' if ok else 'OOM'}" for b, ok in mb.get("trials", []))
        lines += ["", f"Largest batch ({mb['cell']}): {mb.get('largest', '-')} (trials: {trials})."]
    best = max(
        (r for r in report["rows"] if r.get("status") == "ok"), key=lambda r: r["samples_per_s"], default=None
    )
    if best is not None and best.get("mfu_measured") is not None:
        verdict = "met" if best["mfu_measured"] >= 0.40 else "missed"
        lines += [
            "",
            f"Target (issue 9): at least 40% MFU against the measured ceiling: {verdict} by the fastest row "
            f"({best['cell']}, batch {best['batch']}: {100 * best['mfu_measured']:.1f}%).",
        ]
    lines += [
        "",
        "Columns: `clip` is everything between the end of backward and AdamW (finite-loss check, unscale, the "
        "grad-norm metric and the clipping itself); `other` is the step time no phase accounts for (host gaps, "
        "zero_grad, metric stacking); `x authors` is samples/s over the `authors-fp16` row at the same batch.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="ModelConfig preset: base (paper), small, tiny")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig override (repeatable; YAML value), e.g. --set variant=mas",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32, help="per-device batch of every cell (the paper's 32)")
    p.add_argument(
        "--cells",
        default=",".join([*CELLS, COMPILE]),
        help=f"comma-separated subset of {[*CELLS, COMPILE]}; `compile` runs the fastest bf16 cell compiled",
    )
    p.add_argument(
        "--max-batch",
        default="none",
        help="`search`: also run --max-batch-cells at the largest batch that fits (found by doubling then "
        "bisecting, or reused from --merge); N: at batch N; `none`: no such rows",
    )
    p.add_argument("--max-batch-cells", default=f"sdpa-bf16,{COMPILE}")
    p.add_argument("--max-batch-cap", type=int, default=1024, help="stop doubling above this batch")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled cell (aot_eager checks tracing without code generation)",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument(
        "--ceiling-size", type=int, default=8192, help="n of the bf16 n^3 matmul ceiling; 0 skips it"
    )
    p.add_argument("--ceiling-reps", type=int, default=30)
    p.add_argument(
        "--loader", action="store_true", help="real batches from xkd.pipeline instead of synthetic ones"
    )
    p.add_argument(
        "--shards", help="shard directory for --loader (written by xkd-shard or benchmarks/loader.py)"
    )
    p.add_argument("--backend", default="auto", choices=("auto", "dali", "pyav"), help="DataConfig.backend")
    p.add_argument(
        "--dali-device", default="auto", choices=("auto", "mixed", "cpu"), help="DataConfig.dali_device"
    )
    p.add_argument("--num-workers", type=int, default=DataConfig.num_workers, help="DataConfig.num_workers")
    p.add_argument(
        "--dali-threads", type=int, default=DataConfig.dali_threads, help="DataConfig.dali_threads"
    )
    p.add_argument("--merge", type=Path, help="JSON of an earlier run on the same device whose rows are kept")
    p.add_argument(
        "--cell-timeout", type=float, default=480, help="seconds before a cell's worker is stopped"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown table; the JSON goes beside it")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cells = args.cells.split(",")
    unknown = [c for c in cells + args.max_batch_cells.split(",") if c and c not in (*CELLS, COMPILE)]
    if unknown:
        p.error(f"--cells/--max-batch-cells: unknown {unknown}; choose from {[*CELLS, COMPILE]}")
    if args.loader and not args.shards:
        p.error("--loader needs --shards DIR")
    if args.max_batch not in ("none", "search") and not args.max_batch.isdigit():
        p.error(f"--max-batch {args.max_batch!r}: give none, search or a batch size")
    return args


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD a ModelConfig field")
        out[field] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    model_overrides = overrides(args)
    cfg = ModelConfig.from_name(args.size, **model_overrides)  # fails here on a bad override, not in a worker
    env = environment()
    base = {
        "device": args.device,
        "size": args.size,
        "overrides": model_overrides,
        "steps": args.steps,
        "warmup": args.warmup,
        "loader": args.loader,
        "shards": args.shards,
        "backend": args.backend,
        "dali_device": args.dali_device,
        "num_workers": args.num_workers,
        "dali_threads": args.dali_threads,
        "max_batch_cap": args.max_batch_cap,
        "compile": False,
        "compile_backend": args.compile_backend,
    }
    if args.ceiling_size:
        print(f"== device facts and bf16 matmul ceiling ({args.ceiling_size}^3)", file=sys.stderr, flush=True)
    spec = {**base, "kind": "probe", "ceiling_size": args.ceiling_size, "ceiling_reps": args.ceiling_reps}
    spec["ceiling_warmup"] = 5
    # A worker keeps CUDA out of this process; on the CPU there is no context to keep out.
    probed = probe_device(spec) if args.device == "cpu" else run_worker(spec, args.cell_timeout)
    if probed.get("status") != "ok":
        raise SystemExit(
            f"benchmarks/train_step.py: cannot use --device {args.device}: {probed.get('error')}"
        )
    env |= probed["device"]
    previous = json.loads(args.merge.read_text()) if args.merge and args.merge.is_file() else None
    if previous and previous["environment"]["device"] != env["device"]:
        raise SystemExit(
            f"--merge {args.merge}: measured on {previous['environment']['device']}, not {env['device']}"
        )
    rows: list[dict[str, Any]] = list(previous["rows"]) if previous else []
    ceiling = probed["ceiling"]
    if previous and not args.ceiling_size:
        ceiling = previous["ceiling"]
    data = "synthetic"
    if args.loader:
        data = f"loader:{args.backend}" + (f"/{args.dali_device}" if args.backend != "pyav" else "")

    def run(cell: str, batch: int) -> None:
        compiled = cell == COMPILE
        if compiled:
            eager = [
                r
                for r in rows
                if r.get("status") == "ok" and r["cell"] in CELLS and not CELLS[r["cell"]].release
            ]
            if not eager:
                rows.append(
                    {
                        "cell": cell,
                        "batch": batch,
                        "data": data,
                        "status": "skipped",
                        "error": "no bf16 cell measured to compile",
                    }
                )
                return
            fastest = max(eager, key=lambda r: r["samples_per_s"])["cell"]
        print(f"== {cell} batch {batch} ({data})", file=sys.stderr, flush=True)
        spec = {
            **base,
            "kind": "measure",
            "cell": fastest if compiled else cell,
            "batch": batch,
            "compile": compiled,
        }
        row = {"cell": f"{COMPILE}({fastest})" if compiled else cell, "batch": batch, "data": data}
        row |= {"steps": args.steps, "warmup": args.warmup}
        row |= run_worker(spec, args.cell_timeout)
        rows.append(row)
        write_report(args, argv, env, cfg, ceiling, max_batch, rows)

    max_batch = previous.get("max_batch") if previous else None
    for cell in filter(None, args.cells.split(",")):
        run(cell, args.batch)
    if args.max_batch != "none":
        cells = [c for c in args.max_batch_cells.split(",") if c]
        if args.max_batch.isdigit():
            max_batch = {"cell": cells[0], "largest": int(args.max_batch), "trials": []}
        elif not (max_batch and max_batch.get("largest")):
            print(f"== largest batch of {cells[0]}", file=sys.stderr, flush=True)
            search_cell = cells[0] if cells[0] in CELLS else "sdpa-bf16"
            spec = {**base, "kind": "max_batch", "cell": search_cell, "batch": args.batch}
            max_batch = {"cell": search_cell} | run_worker(spec, args.cell_timeout)
        if max_batch.get("largest"):
            for cell in cells:
                run(cell, max_batch["largest"])
                if rows[-1].get("status") == "oom":  # a fresh process can fragment differently: 1/8 less
                    run(cell, max_batch["largest"] * 7 // 64 * 8)
    report = write_report(args, argv, env, cfg, ceiling, max_batch, rows)
    print(markdown(report))
    return report


def write_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    env: dict[str, Any],
    cfg: ModelConfig,
    ceiling: dict[str, Any],
    max_batch: dict[str, Any] | None,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """MFU and speed-ups of every row, then the Markdown table and the JSON (rewritten after every row, so a run
    stopped half-way still leaves the rows it measured)."""
    flops = flops_per_sample(cfg)
    ceilings = {
        "measured": ceiling.get("tflops"),
        "reference": train.TrainConfig.mfu_ceiling_flops / 1e12,
        "datasheet": datasheet_peak(env["device"])[0],
    }
    authors = {
        r["batch"]: r["samples_per_s"] for r in rows if r["cell"] == BASELINE and r.get("status") == "ok"
    }
    for row in rows:
        add_mfu(row, flops, ceilings)
        if row.get("status") == "ok" and row["batch"] in authors:
            row["speedup_vs_authors"] = row["samples_per_s"] / authors[row["batch"]]
    report = {
        "environment": env,
        "argv": sys.argv[1:] if argv is None else argv,
        "size": args.size,
        "overrides": overrides(args),
        "steps": args.steps,
        "warmup": args.warmup,
        "gflops_per_sample": flops / 1e9,
        "gflops_breakdown": {k: v / 1e9 for k, v in flops_breakdown(cfg).items()},
        "ceiling": ceiling,
        "ceilings": ceilings,
        "datasheet_part": datasheet_peak(env["device"])[1],
        "max_batch": max_batch,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
