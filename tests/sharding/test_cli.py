"""`xkd-shard` end to end: the five layouts with every bad-input case, readers (tar, webdataset, DALI), verify,
stats, resume after `kill -9`, `--part` + merge, worker crashes and the exit status (`xkd.sharding.cli`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from xkd.sharding import cli
from xkd.sharding.encode import EncodeParams, Task
from xkd.sharding.layouts import Item
from xkd.sharding.manifest import failure_fraction, read_manifest
from xkd.sharding.runner import _sigint_deferred, execute
from xkd.sharding.verify import verify
from xkd.sharding.writer import STATE_DIR

FAST = ["--workers", "0", "--no-progress", "--max-failed", "1", "--max-shard-samples", "3"]


def shard(src: Path, out: Path, *extra: str) -> int:
    return cli.main(["--src", str(src), "--out", str(out), *FAST, *extra])


def check_shard_set(out: Path, rows_expected: int, sh, audio_only: bool = False) -> list:
    """The invariants every shard set must satisfy; returns the manifest rows."""
    rows = read_manifest(out / "manifest.parquet")
    assert len(rows) == rows_expected, [r.source for r in rows]
    assert all(r.reason for r in rows if r.status != "ok"), "a failed row without a reason"
    samples = sh.read_samples(out)
    assert sum(r.samples for r in rows if r.status == "ok") == len(samples)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["schema_version"] == 1 and dataset["counts"]["samples"] == len(samples)
    assert sum(s["samples"] for s in dataset["shards"]) == len(samples)
    assert not list(out.glob("*.partial")) and not (out / STATE_DIR / "work").exists()
    # GNU tar lists every member.
    members = sum(len(s) - 1 for s in samples.values())
    listed = [
        subprocess.run(["tar", "-tf", str(p)], capture_output=True, text=True, check=True)
        for p in out.glob("*.tar")
    ]
    assert sum(len(t.stdout.splitlines()) for t in listed) == members
    # webdataset with its default decoders; decoded video matches its json.
    seen = 0
    for sample in wds.WebDataset(sorted(map(str, out.glob("*.tar"))), shardshuffle=False).decode():
        meta, mel = sample["json"], sample["mel.npy"]
        assert mel.dtype == np.float16 and mel.shape == (80, meta["mel_frames"])
        assert meta["key"] == sample["__key__"]
        if audio_only:
            assert "video.mp4" not in sample and meta["num_frames"] == 0
        else:
            with av.open(io.BytesIO(sample["video.mp4"])) as c:
                frames = [f for f in c.decode(video=0)]
                fps = float(c.streams.video[0].average_rate)
            assert (len(frames), frames[0].width, frames[0].height) == (
                meta["num_frames"],
                meta["width"],
                meta["height"],
            )
            assert fps == meta["fps"] == 8.0 and meta["duration_s"] == pytest.approx(len(frames) / 8.0)
            assert meta["mel_frames"] == 1 + round(meta["duration_s"] * 16000) // 143
        seen += 1
    assert seen == len(samples)
    checked, problems = verify(out)
    assert checked == len(samples) and problems == []
    return rows


def check_dali(out: Path, audio_only: bool = False) -> None:
    """DALI's fn.readers.webdataset on the CPU reads every sample; its decoder agrees with the json."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    shards = sorted(out.glob("*.tar"))
    index = [str(out / "index" / (p.stem + ".idx")) for p in shards]
    exts = ["json", "mel.npy"] if audio_only else ["json", "mel.npy", "video.mp4"]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        parts = fn.readers.webdataset(
            paths=[str(p) for p in shards],
            index_paths=index,
            ext=exts,
            name="r",
            dtypes=[types.UINT8] * len(exts),
        )
        meta, mel = parts[0], fn.decoders.numpy(parts[1])
        if audio_only:
            return meta, mel
        return meta, mel, fn.decoders.video(parts[2], device="cpu")

    p = pipe()
    p.build()
    total = p.reader_meta("r")["epoch_size"]
    keys = set()
    for _ in range(total):
        outs = p.run()
        meta = json.loads(bytes(np.array(outs[0][0])))
        keys.add(meta["key"])
        assert np.array(outs[1][0]).shape == (80, meta["mel_frames"])
        if not audio_only:
            assert np.array(outs[2][0]).shape == (meta["num_frames"], meta["height"], meta["width"], 3)
    assert len(keys) == total == json.loads((out / "dataset.json").read_text())["counts"]["samples"]


@pytest.fixture(scope="module")
def generic_tree(media, tmp_path_factory, sh) -> Path:
    """<split>/<class>/file with names that look like options and URLs, and the bad inputs of issue 3."""
    root = tmp_path_factory.mktemp("generic") / "mixed"
    cases = {
        "train/dog/ok1.mp4": "av",
        "train/dog/-leading dash.mp4": "av2",
        "train/cat/a:b.avi": "avi",
        "train/cat/sp ace 'q\"!&()[]@#;,.mp4": "rotated",
        "train/cat/ünïcødé 名前.mp4": "odd",
        "train/dog/trunc_head.mp4": "trunc_head",
        "val/dog/vfr.mp4": "vfr",
        "val/cat/silent.avi": "silent",
        "train/dog/empty.mp4": "empty",
        "train/cat/text.mp4": "text",
        "val/dog/short.mp4": "short",
        "val/cat/trunc.mp4": "trunc_tail",
        "test/cat/audio_only.mp4": "audio_only",
    }
    for name, case in cases.items():
        sh.put(media, case, root / name)
    sh.put(media, "av2", root / "test" / "dog" / "av2.mp4")
    (root / "train" / "notes.txt").write_text("not an input")
    return root


@pytest.fixture(scope="module")
def generic_run(generic_tree, tmp_path_factory) -> Path:
    """An uninterrupted run over the generic tree: the reference for the resume and the parts tests."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert shard(generic_tree, out, "--max-shard-samples", "2") == 0
    return out


def test_generic_layout_with_every_bad_input(generic_tree, generic_run, sh) -> None:
    rows = check_shard_set(generic_run, 14, sh)
    by_name = {Path(r.source).name: r for r in rows}
    failed = {name: r.reason.split(":")[0] for name, r in by_name.items() if r.status != "ok"}
    assert failed == {
        "empty.mp4": "empty file",
        "text.mp4": "not a media file",
        "short.mp4": "too short",
        "trunc.mp4": "not a media file",
        "audio_only.mp4": "no video stream",
    }
    assert by_name["silent.avi"].has_audio is False and "no audio stream" in by_name["silent.avi"].reason
    assert by_name["-leading dash.mp4"].status == by_name["a:b.avi"].status == "ok"
    assert by_name["ünïcødé 名前.mp4"].source == "train/cat/ünïcødé 名前.mp4"
    assert (by_name["av2.mp4"].width, by_name["av2.mp4"].height, by_name["av2.mp4"].split) == (
        170,
        128,
        "test",
    )
    dataset = json.loads((generic_run / "dataset.json").read_text())
    assert dataset["classes"] == ["cat", "dog"] and dataset["layout"] == "generic"
    assert dataset["counts"]["splits"] == {"test": 1, "train": 6, "val": 2}
    assert dataset["counts"]["train"] == 6 and dataset["counts"]["with_audio"] == 8
    assert set(dataset["mel_stats"]) == {"all", "train", "test", "val"}
    assert dataset["mel_stats"]["all"]["samples"] == 8  # the silent sample stays out of the statistics
    assert dataset["parameters"]["fps"] == 8.0 and dataset["parameters"]["mel"]["hop_length"] == 143
    assert dataset["tool"]["name"] == "xkd-shard"
    # Shards are named per split and hold at most --max-shard-samples.
    assert {s["name"] for s in dataset["shards"]} >= {
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    }
    check_dali(generic_run)


def test_exit_status_follows_max_failed(generic_tree, generic_run, tmp_path, capsys) -> None:
    # A finished run is not redone: the rerun only rewrites the manifest, and 5 of 14 failed > 5%.
    assert (
        cli.main(
            [
                "--src",
                str(generic_tree),
                "--out",
                str(generic_run),
                "--workers",
                "0",
                "--max-shard-samples",
                "2",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "more than --max-failed 0.05" in err and "file/s" in err and "failed=5" in err
    assert cli.main(["stats", str(generic_run)]) == 0
    assert "failures by reason" in capsys.readouterr().out
    # Changed parameters on the same --out are refused with a way out.
    assert shard(generic_tree, generic_run, "--fps", "4") == 2
    assert "--overwrite" in capsys.readouterr().err


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xkd.sharding.cli", *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_shards(proc: subprocess.Popen, journal: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"event": "shard"') >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended (status {proc.poll()}) before writing {count} shard(s)")


def test_ctrl_c_waits_for_the_sample_being_written_whichever_thread_the_kernel_picks() -> None:
    # A thread with SIGINT unblocked, as the process pool's: the kernel may deliver Ctrl-C there, and Python then
    # raises KeyboardInterrupt in the main thread. A shard closed at that instant held a truncated member.
    idle = threading.Event()
    other = threading.Thread(target=idle.wait)
    other.start()
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt), _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            finished.append("sample")
    finally:
        idle.set()
        other.join()
    assert finished == ["sample"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_then_kill_minus_9_then_rerun_equals_uninterrupted(
    generic_tree, generic_run, tmp_path, sh
) -> None:
    out = tmp_path / "killed"
    args = ["--src", str(generic_tree), "--out", str(out), *FAST, "--max-shard-samples", "2"]
    journal = out / STATE_DIR / "journal.jsonl"
    # Ctrl-C: the run stops with status 130 and keeps the samples it has (the open shard is finished).
    proc = _start(args)
    _wait_for_shards(proc, journal, 1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    after_interrupt = journal.read_text().count('"event": "shard"')
    assert not list(out.glob("*.partial"))
    # kill -9 of the whole process group while it works on the next shard.
    proc = _start(args)
    _wait_for_shards(proc, journal, after_interrupt + 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.parquet").exists()
    assert shard(generic_tree, out, "--max-shard-samples", "2") == 0
    assert sh.content_of(out) == sh.content_of(generic_run)  # same keys, json, mel bytes and decoded frames
    assert _rows(out / "manifest.parquet") == _rows(generic_run / "manifest.parquet")
    assert verify(out)[1] == []


def test_resume_inside_a_file_cut_into_windows(media, tmp_path, sh) -> None:
    # A crash between two shards that share the windows of one file: the rerun makes only the missing windows.
    root = tmp_path / "src"
    for name in ("a", "b", "c"):
        sh.put(media, "long", root / "cls" / f"{name}.mp4")
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = ["--clip-seconds", "2", "--max-shard-samples", "3"]
    assert shard(root, reference, *args) == 0
    shutil.copytree(reference, out)
    journal = out / STATE_DIR / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    last_shard = max(i for i, line in enumerate(lines) if '"event": "shard"' in line)
    journal.write_text("".join(lines[:last_shard]) + lines[last_shard][:50])  # and a torn last line
    (out / "manifest.parquet").unlink()
    assert shard(root, out, *args) == 0
    rows = check_shard_set(out, 3, sh)
    assert [r.samples for r in rows] == [2, 2, 2]
    assert any("," in r.shard for r in rows)  # one file's windows span two shards
    assert sh.content_of(out) == sh.content_of(reference)
    assert _rows(out / "manifest.parquet") == _rows(reference / "manifest.parquet")


def _rows(path: Path) -> list[dict]:
    # Everything but where the sample landed and how long it took.
    return [
        {k: v for k, v in r.to_dict().items() if k not in ("shard", "elapsed_s")} for r in read_manifest(path)
    ]


def test_parts_then_merge_equal_one_run(generic_tree, generic_run, tmp_path, sh, capsys) -> None:
    out = tmp_path / "parts"
    for i in (1, 2):
        assert shard(generic_tree, out, "--part", f"{i}/3", "--max-shard-samples", "2") == 0
    assert cli.main(["merge", str(out)]) == 1
    assert "part(s) 3/3 missing" in capsys.readouterr().err
    assert shard(generic_tree, out, "--part", "3/3", "--max-shard-samples", "2") == 0
    assert cli.main(["merge", str(out)]) == 0
    names = {p.name for p in out.glob("*.tar")}
    assert names and all("-p00" in n and "of003-" in n for n in names)
    assert _rows(out / "manifest.parquet") == _rows(generic_run / "manifest.parquet")
    assert sh.content_of(out) == sh.content_of(generic_run)
    merged = json.loads((out / "dataset.json").read_text())
    single = json.loads((generic_run / "dataset.json").read_text())
    assert merged["parts"] == 3 and merged["counts"] == single["counts"]
    for group, stats in single["mel_stats"].items():
        assert merged["mel_stats"][group]["count"] == stats["count"]
        assert merged["mel_stats"][group]["sum"] == pytest.approx(stats["sum"], rel=1e-12)
    assert cli.main(["verify", str(out)]) == 0


def test_kinetics_layout_with_worker_processes(media, bigbuckbunny, tmp_path, sh) -> None:
    root = tmp_path / "kinetics400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        '"passing American football (in game)",-dashid,0,10,train\n'
        "tying bow tie,abc,3,13,train\n"
        "tying bow tie,abc,3,13,train\n"
        "tying bow tie,absent,0,10,train\n"
        "bowling,bbbclip,0,10,train\n"
    )
    (root / "annotations" / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nbowling,v1,0,10,val\n"
    )
    sh.put(media, "av", root / "train" / "passing American football (in game)" / "-dashid_000000_000010.mp4")
    sh.put(media, "av2", root / "train" / "tying bow tie" / "abc_000003_000013.mp4")
    sh.put(media, "silent", root / "val" / "v1_000000_000010.mp4")
    sh.put(media, "av", root / "train" / "stray_000000_000010.mp4")
    (root / "train" / "bowling").mkdir()
    shutil.copyfile(
        bigbuckbunny, root / "train" / "bowling" / "bbbclip_000000_000010.mp4"
    )  # real 720p, 5.1 AAC
    out = tmp_path / "out"
    assert cli.main(["--src", str(root), "--out", str(out), "--workers", "2", "--max-failed", "1"]) == 0
    rows = check_shard_set(out, 6, sh)
    reasons = sorted(r.reason.split(":")[0] for r in rows if r.status != "ok")
    assert reasons == ["missing file", "not annotated"]
    bbb = next(r for r in rows if r.source.endswith("bbbclip_000000_000010.mp4"))
    assert (bbb.width, bbb.height, bbb.label_name, bbb.source_width) == (228, 128, "bowling", 1280)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["classes"] == ["bowling", "passing American football (in game)", "tying bow tie"]
    samples = sh.read_samples(out)
    metas = {sh.load_meta(s)["source"]: sh.load_meta(s) for s in samples.values()}
    abc = metas["train/tying bow tie/abc_000003_000013.mp4"]
    assert (abc["label"], abc["split"], abc["extra"]["youtube_id"]) == (2, "train", "abc")
    assert metas["val/v1_000000_000010.mp4"]["split"] == "val"
    assert {p.name for p in out.glob("*.tar")} == {"train-000000.tar", "val-000000.tar"}


def test_ucf101_layout(media, tmp_path, sh) -> None:
    root = tmp_path / "UCF101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_bytes(
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nHandstandPushups/v_HandstandPushups_g08_c01.avi 2\r\n"
    )
    (lists / "testlist01.txt").write_bytes(
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nHandstandPushups/v_HandstandPushups_g01_c01.avi\r\n"
    )
    videos = root / "UCF-101"
    sh.put(media, "avi", videos / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    sh.put(media, "silent", videos / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi")
    sh.put(media, "avi", videos / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi")
    sh.put(media, "avi", videos / "HandstandPushups" / "v_HandStandPushups_g09_c01.avi")  # in no list
    out = tmp_path / "out"
    assert shard(root, out) == 0
    rows = check_shard_set(out, 5, sh)  # 4 files + 1 listed but absent
    assert sorted(r.reason.split(":")[0] for r in rows if r.status != "ok") == [
        "missing file",
        "not in any split file",
    ]
    assert {p.name for p in out.glob("*.tar")} == {"all-000000.tar"}
    metas = [sh.load_meta(s) for s in sh.read_samples(out).values()]
    hs = next(m for m in metas if "HandStand" in m["source"])
    assert (hs["label"], hs["label_name"], hs["split"], hs["folds"]) == (
        1,
        "HandstandPushups",
        "all",
        {"1": "train"},
    )
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["fold_dataset"] and dataset["counts"]["folds"] == {"1": {"test": 1, "train": 2}}
    assert dataset["counts"]["train"] == 2 and dataset["mel_stats"]["train"]["samples"] == 2
    check_dali(out)


def test_hmdb51_layout(media, tmp_path, sh) -> None:
    root = tmp_path / "hmdb"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    names = [
        "Glory_-_Pull_ups!_pullup_f_cm_np1_ba_bad_2.avi",
        "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
        "x(1)[2]@&;,'.avi",
    ]
    (splits / "pullup_test_split1.txt").write_text(f"{names[0]} 1 \n{names[2]} 2 \n")
    (splits / "pullup_test_split2.txt").write_text(f"{names[0]} 2 \n{names[2]} 0 \n")
    (splits / "clap_test_split1.txt").write_text(f"{names[1]} 1 \n")
    sh.put(media, "avi", root / "hmdb51" / "pullup" / names[0])
    sh.put(media, "av2", root / "hmdb51" / "pullup" / names[2])
    sh.put(media, "text", root / "hmdb51" / "clap" / names[1])
    out = tmp_path / "out"
    assert shard(root, out) == 0
    rows = check_shard_set(out, 3, sh)
    assert [r.reason.split(":")[0] for r in rows if r.status != "ok"] == ["not a media file"]
    metas = {sh.load_meta(s)["source"]: sh.load_meta(s) for s in sh.read_samples(out).values()}
    assert metas[f"hmdb51/pullup/{names[0]}"]["folds"] == {"1": "train", "2": "test"}
    assert metas[f"hmdb51/pullup/{names[2]}"]["folds"] == {"1": "test"}


def test_esc50_layout_audio_only(media, tmp_path, sh) -> None:
    root = tmp_path / "ESC-50-master"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-1-A-0.wav,1,0,dog,True,1,A\n2-2-A-1.wav,2,1,rooster,False,2,A\n"
        "3-3-A-1.wav,3,1,rooster,False,3,A\n4-4-A-0.wav,4,0,dog,True,4,A\n"
    )
    sh.put(media, "wav", root / "audio" / "1-1-A-0.wav")
    sh.put(media, "wav", root / "audio" / "2-2-A-1.wav")
    sh.put(media, "text", root / "audio" / "4-4-A-0.wav")
    out = tmp_path / "out"
    assert shard(root, out) == 0
    rows = check_shard_set(out, 4, sh, audio_only=True)
    assert sorted(r.reason.split(":")[0] for r in rows if r.status != "ok") == [
        "missing file",
        "not a media file",
    ]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["audio_only"] and dataset["layout"] == "esc50" and dataset["classes"] == ["dog", "rooster"]
    assert dataset["counts"]["folds"]["1"] == {"test": 1, "train": 1}
    check_dali(out, audio_only=True)


def test_demo_dataset_shards(tmp_path, sh) -> None:
    demo = pytest.importorskip("xkd.sharding.demo")
    raw = tmp_path / "raw"
    subprocess.run(
        [sys.executable, "-m", demo.__name__, "--out", str(raw), "--mini", "--workers", "1"],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "shards"
    assert shard(raw, out, "--max-shard-samples", "1000") == 0
    rows = read_manifest(out / "manifest.parquet")
    assert rows and all(r.status == "ok" for r in rows)
    assert json.loads((out / "dataset.json").read_text())["layout"] == "ucf101"


def test_a_crashing_worker_fails_only_its_file(media, tmp_path, monkeypatch) -> None:
    # A worker function that kills its process on one file, importable by the worker processes.
    (tmp_path / "crashy.py").write_text(
        "import os\nfrom xkd.sharding.encode import encode_file\n\n\n"
        "def work(task):\n    if 'crash' in task.item.source:\n        os._exit(9)\n    return encode_file(task)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import crashy

    work_dir = tmp_path / "work"
    work_dir.mkdir()
    names = ["a.mp4", "crash.mp4", "b.mp4", "c.mp4"]
    tasks = [Task(Item(n, media["av"], "train"), "t", EncodeParams(), work_dir) for n in names]
    rows = {r.row.source: r.row for r in execute(tasks, 2, crashy.work)}
    assert sorted(rows) == sorted(names)
    assert {name: row.status for name, row in rows.items()} == {
        "a.mp4": "ok",
        "crash.mp4": "failed",
        "b.mp4": "ok",
        "c.mp4": "ok",
    }
    assert rows["crash.mp4"].reason.startswith("worker crashed")


def test_failure_fraction_leaves_out_deliberate_skips() -> None:
    from xkd.sharding.manifest import ManifestRow

    rows = [
        ManifestRow("a", "k", "d", status="ok"),
        ManifestRow("b", "k", "d", reason="skipped: no audio stream: x"),
    ]
    rows.append(ManifestRow("c", "k", "d", reason="empty file: 0 bytes"))
    assert failure_fraction(rows) == pytest.approx(1 / 3)


def test_an_empty_source_is_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "src" / "cls").mkdir(parents=True)
    (tmp_path / "src" / "cls" / "readme.txt").write_text("no media here")
    assert shard(tmp_path / "src", tmp_path / "out") == 2
    assert "no video files found under" in capsys.readouterr().err
