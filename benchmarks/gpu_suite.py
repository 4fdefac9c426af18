"""The GPU-machine suite of issue 9: every GPU check and benchmark of the project, run on a lent H100/H200 by one
script, writing one results file `gpu-<device>-<date>.md` (with the numbers as JSON beside it).

The GPU machine has torch but no network and lacks some of our dependencies (`../shared/environment.md`, "The GPU
machine"), and a device call carries at most 64 MiB. So the work is split in two halves around a wheel transfer:

- here, `benchmarks/fetch_gpu_wheels.sh` downloads the missing wheels into `.whl/<set>/` and calls `pack`, which
  cuts them into carry folders `.dali-a/`, `.dali-b/`, ... (git-ignored), filled in the order the sets are needed:
  `base` (what `import train` and collecting the tests need), `media` (the ffmpeg binary, ffmpeg-python, the
  real test clip), `dali`;
- there, every call runs `python3 benchmarks/gpu_suite.py run auto` carrying the next folder: the suite stages the
  pieces it finds under /tmp/xkd-gpu (kept while the machine stays warm), joins and installs each set as soon as
  it is complete (`pip install --no-deps --target`, one site folder per set on PYTHONPATH), runs every pending step
  whose sets are installed within the call's time budget, and writes the cumulative report to $OUT.

Steps, in the order a call runs them (`docs/benchmarks/gpu-plan.md` gives the call sequence and expected times):

| step | needs | what |
| --- | --- | --- |
| shards | base, media | the loader benchmark's VP9 shards (sharded once, reused by `loader` and `train-loader`) |
| tests | all | `pytest -m gpu`, including DALI `mixed` against the CPU reference |
| loader | all | `benchmarks/loader.py`: DALI mixed / DALI cpu / PyAV on all cores / the authors' decode-at-load |
| train-loader | all | the train step fed by the real loader (DALI mixed, PyAV): data-wait fraction |
| train | base | `benchmarks/train_step.py`: SDPA / explicit bf16 and the authors' fp16 cells at batch 32, largest batch |
| compile | base | the fastest bf16 cell under torch.compile at batch 32 |
| compile-max, repeat | base | optional: compile at the largest batch; the eager cells again (run-to-run spread) |
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ("base", "media", "dali")
CARRY_PREFIX = ".dali-"  # the pattern .gitignore already ignores; the folders carry every set, not only DALI
MANIFEST = "manifest.json"
WORK = Path(os.environ.get("XKD_GPU_WORK", "/tmp/xkd-gpu"))
RESULTS = WORK / "results"
TRAIN_JSON = RESULTS / "train_step.json"
LOADER_WORK = WORK / "bench-loader"
# Source clips of the loader benchmark: 4 per shard gives 16 shards, enough for one per decode worker on 16 cores
# (a training stream needs at least as many shards as workers).
LOADER_CLIPS = 64
# The call is stopped at 600 s; leave room for the report and the copy to $OUT.
DEFAULT_BUDGET_S = 560
REPORT_RESERVE_S = 20
MAX_ATTEMPTS = 2


# ---- packing (here) ----
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pack(wheels: Path, out: Path, part_mib: float) -> list[Path]:
    """Cut the wheels of `wheels/<set>/` into folders `.dali-a`, `.dali-b`, ... of at most `part_mib` MiB, as one
    stream in set order (so `base` is complete in the first folder), each folder holding the same manifest."""
    capacity = int(part_mib * 2**20) - (1 << 16)  # the manifest travels in every folder
    for old in out.glob(CARRY_PREFIX + "*"):
        shutil.rmtree(old)
    entries, folders, used = [], [], capacity  # `used = capacity` opens a folder at the first piece
    for name in SETS:
        found = sorted((wheels / name).glob("*.whl"))
        if not found:
            print(f"pack: no wheels in {wheels / name}: set {name} will not be installed on the GPU machine")
        for wheel in found:
            data = wheel.read_bytes()
            entry = {
                "set": name,
                "name": wheel.name,
                "size": len(data),
                "sha256": sha256(wheel),
                "pieces": [],
            }
            offset = 0
            while offset < len(data):
                if used >= capacity:
                    folders.append(out / f"{CARRY_PREFIX}{chr(ord('a') + len(folders))}")
                    used = 0
                piece = data[offset : offset + capacity - used]
                target = folders[-1] / name / f"{wheel.name}.{len(entry['pieces']):03d}"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(piece)
                entry["pieces"].append(
                    {
                        "folder": folders[-1].name,
                        "file": f"{name}/{target.name}",
                        "size": len(piece),
                        "sha256": hashlib.sha256(piece).hexdigest(),
                    }
                )
                offset += len(piece)
                used += len(piece)
            entries.append(entry)
    manifest = json.dumps({"folders": [f.name for f in folders], "wheels": entries}, indent=1)
    for folder in folders:
        (folder / MANIFEST).write_text(manifest)
    return folders


def tree_bytes() -> int:
    """Bytes of what every device call sends besides the carried folder: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (REPO / os.fsdecode(p)).stat().st_size for p in listed if p and (REPO / os.fsdecode(p)).is_file()
    )


# ---- staging and installing (there) ----
def load_manifest() -> dict | None:
    """The manifest of the carried folders, checked to be one and the same across calls."""
    saved = WORK / MANIFEST
    for folder in sorted(REPO.glob(CARRY_PREFIX + "*")):
        found = folder / MANIFEST
        if not found.is_file():
            continue
        if saved.is_file() and saved.read_text() != found.read_text():
            raise SystemExit(
                f"{folder.name}/{MANIFEST} differs from the one staged earlier on this machine: the wheels were "
                "packed again in between. Start over on a fresh machine with folders of one packing."
            )
        WORK.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, saved)
    return json.loads(saved.read_text()) if saved.is_file() else None


def stage(manifest: dict) -> None:
    """Copy the pieces of every carried folder into WORK/parts, checking each against the manifest."""
    for entry in manifest["wheels"]:
        for piece in entry["pieces"]:
            src, dst = REPO / piece["folder"] / piece["file"], WORK / "parts" / piece["file"]
            if (dst.is_file() and dst.stat().st_size == piece["size"]) or not src.is_file():
                continue
            if sha256(src) != piece["sha256"]:
                raise SystemExit(
                    f"{piece['folder']}/{piece['file']}: checksum mismatch, the transfer is damaged"
                )
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            print(f"staged {piece['folder']}/{piece['file']}", flush=True)


def missing_folders(manifest: dict, name: str) -> list[str]:
    return sorted(
        {
            piece["folder"]
            for entry in manifest["wheels"]
            if entry["set"] == name
            for piece in entry["pieces"]
            if not (WORK / "parts" / piece["file"]).is_file()
        }
    )


def install(manifest: dict) -> None:
    """Join and install every set whose pieces are all staged and which is not installed yet."""
    for name in SETS:
        site, marker = WORK / f"site-{name}", WORK / f"installed-{name}"
        packed = any(e["set"] == name for e in manifest["wheels"])
        if marker.is_file() or not packed or missing_folders(manifest, name):
            continue
        joined = []
        for entry in (e for e in manifest["wheels"] if e["set"] == name):
            wheel = WORK / "wheels" / name / entry["name"]
            wheel.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open("wb") as out:
                for piece in entry["pieces"]:
                    out.write((WORK / "parts" / piece["file"]).read_bytes())
            if sha256(wheel) != entry["sha256"]:
                raise SystemExit(f"{entry['name']}: checksum mismatch after joining its pieces")
            joined.append(str(wheel))
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += [
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *os.environ.get("XKD_PIP_ARGS", "").split(),
        ]
        subprocess.run([*cmd, *joined], check=True)
        # DALI's wheel makes `nvidia` a namespace portion, which a regular `nvidia` package of the image (one with
        # an __init__.py) would shadow; a pkgutil-style one here comes first on PYTHONPATH and merges both.
        init = site / "nvidia" / "__init__.py"
        if init.parent.is_dir() and not init.exists():
            init.write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
        marker.write_text(json.dumps({"wheels": [Path(w).name for w in joined]}))
        print(f"installed set {name} ({len(joined)} wheels) in {time.monotonic() - start:.0f} s", flush=True)


def step_env() -> dict[str, str]:
    """Environment of the steps: the xkd package from this tree and the installed sets on PYTHONPATH."""
    src = WORK / "src" / "xkd"
    src.mkdir(parents=True, exist_ok=True)
    for part in ("model", "pipeline", "sharding"):  # what `pip install -e .` maps under the xkd namespace
        link = src / part
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / part)
    paths = [str(WORK / "src")]
    paths += [str(WORK / f"site-{n}") for n in reversed(SETS) if (WORK / f"installed-{n}").is_file()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def installed() -> set[str]:
    return {n for n in SETS if (WORK / f"installed-{n}").is_file()}


# ---- steps ----
@dataclass
class Step:
    name: str
    needs: tuple[str, ...]
    min_s: float
    """Time the step needs at least; with less left in this call it waits for the next call."""
    timeout_s: float
    optional: bool = False


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def train_cmd(*args: str) -> list[str]:
    return python("-m", "benchmarks.train_step", "--out", str(RESULTS / "train_step.md"), *args)


# In priority order: a call runs the pending steps it has the sets and the time for, first to last. The open
# issue's GPU checks (#4: DALI `mixed` against the CPU path, the loader rows) come first, so that a 15-minute
# session (docs/benchmarks/gpu-plan.md) spends its last call on them, and the train-step cells on what is left.
STEPS = (
    Step("shards", ("base", "media"), 150, 420),
    Step("tests", SETS, 90, 300),
    Step("loader", SETS, 150, 330),
    Step("train-loader", SETS, 100, 240),
    Step("train", ("base",), 200, 420),
    Step("compile", ("base",), 240, 420),
    Step("compile-max", ("base",), 240, 420, optional=True),
    Step("repeat", ("base",), 120, 300, optional=True),
)


def commands(step: str) -> list[list[str]]:
    """The command lines of a step (run in order, in the repository root)."""
    merge = ["--merge", str(TRAIN_JSON), "--ceiling-size", "0"]
    shards = str(LOADER_WORK / "shards")
    cores = str(max((os.cpu_count() or 2) - 1, 1))  # all cores but the one feeding the GPU
    if step == "train":
        cells = ["--cells", "sdpa-bf16,explicit-bf16,authors-fp16"]
        return [train_cmd(*cells, "--max-batch", "search", "--max-batch-cells", "sdpa-bf16")]
    if step == "compile":
        return [train_cmd(*merge, "--cells", "compile")]
    if step == "compile-max":
        return [train_cmd(*merge, "--cells", "", "--max-batch", "search", "--max-batch-cells", "compile")]
    if step == "repeat":
        return [train_cmd(*merge, "--cells", "sdpa-bf16,explicit-bf16,authors-fp16")]
    if step == "shards":
        # The loader benchmark's own sources and shards, made once; its `main` finds and reuses them.
        code = (
            f"from pathlib import Path; from benchmarks import loader; w = Path({str(LOADER_WORK)!r}); "
            f"loader.make_sources(w / 'sources', {LOADER_CLIPS}, 10.0); loader.make_shards(w / 'sources', w / 'shards')"
        )
        return [python("-c", code)]
    if step == "tests":
        # A module that fails to import here must not hide the GPU tests of the others.
        flags = [
            "-m",
            "gpu",
            "-rA",
            "-p",
            "no:cacheprovider",
            "--timeout",
            "240",
            "--continue-on-collection-errors",
        ]
        return [python("-m", "pytest", *flags, "--junitxml", str(RESULTS / "pytest-gpu.xml"))]
    if step == "loader":
        flags = ["--work", str(LOADER_WORK), "--clips", str(LOADER_CLIPS), "--workers", "4", cores]
        flags += ["--rss-seconds", "0", "--seconds", "10", "--out", str(RESULTS / "loader.md")]
        return [python("benchmarks/loader.py", *flags)]
    if step == "train-loader":
        feed = [*merge, "--cells", "sdpa-bf16", "--loader", "--shards", shards, "--steps", "40"]
        return [
            train_cmd(*feed, "--backend", "dali", "--dali-device", "mixed"),
            train_cmd(*feed, "--backend", "pyav", "--num-workers", cores),
        ]
    raise ValueError(step)


def run_step(step: Step, env: dict[str, str], timeout_s: float) -> tuple[str, float]:
    """Run a step's commands with its output in RESULTS/<step>.log; stop the whole process group on timeout."""
    log_path = RESULTS / f"{step.name}.log"
    start = time.monotonic()
    status = "ok"
    with log_path.open("a") as log:
        for cmd in commands(step.name):
            left = timeout_s - (time.monotonic() - start)
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"timeout after {timeout_s:.0f} s"
                break
            if code == 1 and step.name == "tests":
                status = "finished with test failures"  # a result (see the test table), not a broken step
            elif code:
                status = f"exit {code}"
                break
    return status, time.monotonic() - start


# ---- report ----
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def session() -> dict:
    """Device and date fixed at the first call, so every call writes the same results file."""
    path = WORK / "session.json"
    if not path.is_file():
        query = "name,driver_version,memory.total"
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                .stdout.strip()
                .splitlines()
            )
        except (OSError, subprocess.TimeoutExpired):
            out = []
        name, driver, memory = (out[0].split(", ") + ["?", "?", "?"])[:3] if out else ("no GPU", "-", "-")
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "cpu"
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"device": name, "driver": driver, "memory": memory, "slug": slug, "date": date})
        )
    return read_json(path)


def snapshot(env: dict[str, str], call: int) -> None:
    """Versions and GPU state at the start of a call, appended to RESULTS/env.jsonl."""
    code = (
        "import importlib.metadata as m, json, platform, torch\n"
        "names = ['torch', 'accelerate', 'numpy', 'av', 'webdataset', 'imageio-ffmpeg', 'jsonargparse', "
        "'nvidia-dali-cuda130']\n"
        "v = {}\n"
        "for n in names:\n"
        "    try: v[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: v[n] = None\n"
        "print(json.dumps({'python': platform.python_version(), 'cuda': torch.version.cuda, 'versions': v}))\n"
    )
    info: dict = {"call": call, "time": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")}
    try:
        done = subprocess.run(python("-c", code), env=env, capture_output=True, text=True, timeout=120)
        info |= json.loads(done.stdout.strip().splitlines()[-1])
        query = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used"
        info["gpu"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        info["error"] = repr(err)
    with (RESULTS / "env.jsonl").open("a") as f:
        f.write(json.dumps(info) + "\n")


def strip_title(markdown: str) -> str:
    lines = markdown.splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def table_rows(markdown: str, column: str) -> dict[str, float]:
    """{first cell: value of `column}` of the Markdown table whose header has `column`."""
    rows, index = {}, None
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column in cells:
            index = cells.index(column)
        elif index is not None and line.startswith("|") and not set(cells[0]) <= {"-", " "}:
            try:
                rows[cells[0]] = float(cells[index])
            except (IndexError, ValueError):
                continue
    return rows


def tests_section() -> list[str]:
    xml = RESULTS / "pytest-gpu.xml"
    if not xml.is_file():
        return ["Not run yet."]
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [
        f"`pytest -m gpu`: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped ({float(suite.get('time', 0)):.0f} s).",
        "",
        "| test | result |",
        "| --- | --- |",
    ]
    for case in suite.iter("testcase"):
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                result = f"{tag}: {(found.get('message') or '').splitlines()[0][:160] if found.get('message') else ''}"
        lines.append(f"| {case.get('classname')}::{case.get('name')} | {result} |")
    return lines


def targets_section(train: dict, loader_md: str) -> list[str]:
    rows = [r for r in train.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return ["No train-step numbers yet."]
    fastest = max(rows, key=lambda r: r["samples_per_s"])
    lines = []
    mfu = fastest.get("mfu_measured")
    if mfu is not None:
        lines.append(
            f"- Trainer MFU against the measured ceiling (target >= 40%): {100 * mfu:.1f}% "
            f"({'met' if mfu >= 0.4 else 'missed'}; fastest row {fastest['cell']}, batch {fastest['batch']})."
        )
    rates = table_rows(loader_md, "clips/s")
    for name in ("dali-mixed +photometric", "dali-mixed"):
        if name in rates:
            ratio = rates[name] / fastest["samples_per_s"]
            lines.append(
                f"- Loader over trainer (target >= 1.5x): {name} {rates[name]:.0f} clips/s over "
                f"{fastest['samples_per_s']:.0f} samples/s = {ratio:.2f}x ({'met' if ratio >= 1.5 else 'missed'})."
            )
            break
    else:
        lines.append("- Loader over trainer: no DALI mixed loader rate yet.")
    return lines


def report(state: dict) -> Path:
    info = session()
    train = read_json(TRAIN_JSON)
    loader_md = (RESULTS / "loader.md").read_text() if (RESULTS / "loader.md").is_file() else ""
    snapshots = (
        [json.loads(line) for line in (RESULTS / "env.jsonl").read_text().splitlines()]
        if (RESULTS / "env.jsonl").is_file()
        else []
    )
    first = next((s for s in snapshots if "versions" in s), {})
    versions = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items() if v)
    lines = [
        f"# GPU tests and benchmarks: {info['device']}, {info['date']}",
        "",
        f"Written by `benchmarks/gpu_suite.py` (issue 9; call sequence in `docs/benchmarks/gpu-plan.md`) over "
        f"{state['calls']} device call(s); revision {os.environ.get('XKD_REVISION', 'not given')}. Driver "
        f"{info['driver']}, {info['memory']}; Python {first.get('python', '?')}, CUDA {first.get('cuda', '?')}; {versions}.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | call |",
        "| --- | --- | --- | --- |",
    ]
    for step in STEPS:
        done = state["steps"].get(step.name)
        if done:
            lines.append(f"| {step.name} | {done['status']} | {done['seconds']:.0f} | {done['call']} |")
        else:
            lines.append(f"| {step.name} | {'optional, not run' if step.optional else 'pending'} | - | - |")
    lines += [
        "",
        "## Targets",
        "",
        *targets_section(train, loader_md),
        "",
        "## GPU test suite",
        "",
        *tests_section(),
    ]
    lines += ["", "## Loader", "", strip_title(loader_md) or "Not run yet."]
    train_md = RESULTS / "train_step.md"
    lines += [
        "",
        "## Train step",
        "",
        strip_title(train_md.read_text()) if train_md.is_file() else "Not run yet.",
    ]
    lines += ["", "## GPU state at the start of each call", "", "```"]
    lines += [f"call {s['call']} {s['time']}: {s.get('gpu', s.get('error', ''))}" for s in snapshots]
    lines += ["```", ""]
    path = RESULTS / f"gpu-{info['slug']}-{info['date']}.md"
    path.write_text("\n".join(lines))
    return path


def export(results_md: Path) -> None:
    """Copy the results to $OUT (at most 8 plain files come back): report, JSON, test report, logs."""
    out = os.environ.get("OUT")
    if not out:
        return
    out_dir = Path(out)
    shutil.copyfile(results_md, out_dir / results_md.name)
    for name in ("train_step.json", "pytest-gpu.xml", "loader.md", "state.json"):
        if (RESULTS / name).is_file():
            shutil.copyfile(RESULTS / name, out_dir / name)
    with tarfile.open(out_dir / "logs.tar.gz", "w:gz") as tar:
        for log in sorted(RESULTS.glob("*.log")) + [RESULTS / "env.jsonl"]:
            if log.is_file():
                tar.add(log, arcname=log.name)


# ---- driver ----
def run(names: list[str], budget_s: float) -> None:
    start = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    state = read_json(RESULTS / "state.json") or {"calls": 0, "steps": {}, "attempts": {}}
    state["calls"] += 1
    manifest = load_manifest()
    if manifest is not None:
        stage(manifest)
        install(manifest)
    env = step_env()
    snapshot(env, state["calls"])
    have = installed()
    if "auto" in names:
        wanted = [s for s in STEPS if not s.optional] + [s for s in STEPS if s.optional and s.name in names]
    else:
        wanted = [s for s in STEPS if s.name in names]
    for step in wanted:
        previous = state["steps"].get(step.name, {}).get("status", "")
        if "auto" in names and (previous == "ok" or previous.startswith("finished")):
            continue
        if state["attempts"].get(step.name, 0) >= MAX_ATTEMPTS and "auto" in names:
            continue
        lacking = [n for n in step.needs if n not in have]
        if lacking:
            folders = (
                sorted({f for n in lacking for f in missing_folders(manifest, n)}) if manifest else ["all"]
            )
            print(f"-- {step.name}: waits for set(s) {lacking} (carry {', '.join(folders)})", flush=True)
            continue
        left = budget_s - (time.monotonic() - start) - REPORT_RESERVE_S
        if left < step.min_s:
            print(
                f"-- {step.name}: {left:.0f} s left in this call, needs {step.min_s:.0f}: next call",
                flush=True,
            )
            continue
        print(f"== {step.name} (up to {min(step.timeout_s, left):.0f} s)", flush=True)
        state["attempts"][step.name] = state["attempts"].get(step.name, 0) + 1
        status, seconds = run_step(step, env, min(step.timeout_s, left))
        state["steps"][step.name] = {"status": status, "seconds": seconds, "call": state["calls"]}
        print(f"   {step.name}: {status} in {seconds:.0f} s; log tail:", flush=True)
        print("".join((RESULTS / f"{step.name}.log").read_text().splitlines(keepends=True)[-15:]), flush=True)
        (RESULTS / "state.json").write_text(json.dumps(state, indent=1))
    (RESULTS / "state.json").write_text(json.dumps(state, indent=1))
    results_md = report(state)
    export(results_md)
    print(results_md.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: cut .whl/<set>/*.whl into carry folders .dali-a, .dali-b, ...")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument(
        "--part-mib", type=float, default=60.0, help="folder size; a call carries 64 MiB with the tree"
    )
    r = sub.add_parser("run", help="there: stage carried folders, install complete sets, run steps, report")
    r.add_argument(
        "steps", nargs="+", help=f"`auto` (every pending required step) and/or {[s.name for s in STEPS]}"
    )
    r.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds this call may use")
    args = parser.parse_args(argv)
    if args.command == "pack":
        folders = pack(args.wheels, REPO, args.part_mib)
        tree = tree_bytes()
        for folder in folders:
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            total = (size + tree) / 2**20
            flag = (
                "" if total < 63.5 else "  <-- over the 64 MiB a call carries: pack with a smaller --part-mib"
            )
            print(
                f"{folder.name}: {size / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB = {total:.1f} MiB{flag}"
            )
        return
    unknown = [s for s in args.steps if s != "auto" and s not in {s.name for s in STEPS}]
    if unknown:
        parser.error(f"unknown step(s) {unknown}")
    run(args.steps, args.budget_s)


if __name__ == "__main__":
    main()
