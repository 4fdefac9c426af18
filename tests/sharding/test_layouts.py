"""Layout detection and parsing of the official annotation formats (`xkd.sharding.layouts`).

Listing never opens the media, so these trees hold empty placeholder files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xkd.sharding.layouts import LayoutError, detect_layout, list_sources


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def by_source(listing) -> dict:
    return {item.source: item for item in listing.items}


def test_kinetics_csv_quirks(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        '"passing American football (in game)",-abc_DEF12,10,20,train,0\n'
        "tying bow tie,xyz,0,10,train,0\n"
        "tying bow tie,xyz,0,10,train,0\n"  # duplicate row, same label
        '"massaging person\'s head",gone,5,15,train,0\n'  # listed, no file
        "tying bow tie,clash,1,11,train,0\n"
    )
    (tmp_path / "annotations" / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\ntying bow tie,vvv,3,13,val\nbowling,clash,1,11,val\n"
    )
    touch(
        tmp_path,
        "train/-abc_DEF12_000010_000020.mp4",
        "train/tying bow tie/xyz_000000_000010.mp4",
        "train/xyz_000000_000010.mp4",  # the same clip twice (flat and nested)
        "train/clash_000001_000011.mp4",
        "val/vvv_000003_000013.mp4",
        "val/unlisted_000000_000010.mp4",
        "train/README.txt",
    )
    assert detect_layout(tmp_path) == "kinetics"
    listing = list_sources(tmp_path)
    assert listing.classes == sorted(
        ["passing American football (in game)", "tying bow tie", "massaging person's head", "bowling"]
    )
    items = by_source(listing)
    first = items["train/-abc_DEF12_000010_000020.mp4"]
    assert (first.split, first.label_name, first.error) == (
        "train",
        "passing American football (in game)",
        None,
    )
    assert first.label == listing.classes.index(first.label_name)
    assert first.extra == {"youtube_id": "-abc_DEF12", "time_start": 10, "time_end": 20}
    flat, nested = items["train/xyz_000000_000010.mp4"], items["train/tying bow tie/xyz_000000_000010.mp4"]
    assert flat.error is None and "duplicate listing ignored" in flat.notes[0]
    assert nested.error.startswith("duplicate clip: same clip as train/xyz_000000_000010.mp4")
    assert items["train/gone_000005_000015.mp4"].error.startswith("missing file: listed in train.csv line 5")
    assert items["train/clash_000001_000011.mp4"].error.startswith("conflicting listings: train.csv line 6")
    assert items["val/vvv_000003_000013.mp4"].split == "val"
    assert items["val/unlisted_000000_000010.mp4"].error.startswith("not annotated")
    assert len(listing.items) == 7  # 6 media files + 1 listed-but-absent; README.txt is not an input


def test_ucf101_class_from_folder_case_insensitive_and_folds(tmp_path: Path) -> None:
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_bytes(
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nHandstandPushups/v_HandstandPushups_g08_c01.avi 2\r\n"
    )
    (lists / "testlist01.txt").write_bytes(
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\r\n"
    )
    (lists / "trainlist02.txt").write_bytes(b"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\n")
    touch(
        tmp_path / "UCF-101",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi",  # the original release's spelling
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi",  # in no list
        "Juggling/v_Juggling_g01_c01.avi",  # class folder not in classInd
    )
    assert detect_layout(tmp_path) == "ucf101"
    listing = list_sources(tmp_path)
    assert listing.fold_dataset and listing.folds == ["1", "2"] and listing.dataset == "ucf101"
    assert listing.classes == ["ApplyEyeMakeup", "HandstandPushups"]
    items = by_source(listing)
    hs = items["UCF-101/HandstandPushups/v_HandStandPushups_g08_c01.avi"]
    assert (hs.error, hs.label, hs.label_name, hs.split, hs.folds) == (
        None,
        1,
        "HandstandPushups",
        "all",
        {"1": "train"},
    )
    assert items["UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"].folds == {"1": "test", "2": "train"}
    assert items["UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi"].error.startswith(
        "not in any split file"
    )
    assert items["UCF-101/Juggling/v_Juggling_g01_c01.avi"].error.startswith(
        "unknown class folder 'Juggling'"
    )
    missing = items["UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi"]
    assert missing.path is None and missing.error.startswith("missing file: listed in testlist01.txt line 2")
    assert missing.label == 0 and missing.folds == {"1": "test"}


def test_hmdb51_split_codes_and_special_names(tmp_path: Path) -> None:
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    names = [
        "Glory_-_Pull_ups!_pullup_f_cm_np1_ba_bad_2.avi",
        "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
        "a(b)[c]@d&e,f;g'h.avi",
    ]
    (splits / "pullup_test_split1.txt").write_text(f"{names[0]} 1 \n{names[2]} 2  \nabsent.avi 1\n")
    (splits / "pullup_test_split2.txt").write_text(f"{names[0]} 0\n{names[2]} 1\n")
    (splits / "clap_test_split1.txt").write_text(f"{names[1]} 2\n")
    touch(
        tmp_path / "hmdb51", f"pullup/{names[0]}", f"pullup/{names[2]}", f"clap/{names[1]}", "clap/stray.avi"
    )
    assert detect_layout(tmp_path) == "hmdb51"
    listing = list_sources(tmp_path)
    assert listing.classes == ["clap", "pullup"] and listing.folds == ["1", "2"]
    items = by_source(listing)
    assert items[f"hmdb51/pullup/{names[0]}"].folds == {"1": "train"}  # 0 = unused in split 2
    assert items[f"hmdb51/pullup/{names[2]}"].folds == {"1": "test", "2": "train"}
    assert items[f"hmdb51/clap/{names[1]}"].label == 0
    assert items["hmdb51/clap/stray.avi"].error.startswith("not in any split file")
    assert items["hmdb51/pullup/absent.avi"].error.startswith(
        "missing file: listed in pullup_test_split1.txt line 3"
    )


def test_esc50_folds_and_audio_only(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "2-100038-A-1.wav,2,1,rooster,False,100038,A\n"
        "3-100040-A-1.wav,3,1,rooster,False,100040,A\n"
    )
    touch(tmp_path / "audio", "1-100032-A-0.wav", "2-100038-A-1.wav", "9-extra-A-0.wav")
    assert detect_layout(tmp_path) == "esc50"
    listing = list_sources(tmp_path)
    assert listing.audio_only and listing.fold_dataset and listing.classes == ["dog", "rooster"]
    items = by_source(listing)
    dog = items["audio/1-100032-A-0.wav"]
    assert dog.folds == {"1": "test", "2": "train", "3": "train"} and dog.extra["esc10"] == "True"
    assert items["audio/3-100040-A-1.wav"].error.startswith("missing file")
    assert items["audio/9-extra-A-0.wav"].error.startswith("not annotated")


def test_generic_layouts(tmp_path: Path) -> None:
    touch(
        tmp_path / "a",
        "train/cat/1.mp4",
        "Validation/dog/2.MKV",
        "test/3.webm",
        "train/cat/sub/4.avi",
        "train/x.txt",
    )
    listing = list_sources(tmp_path / "a", dataset="pets")
    items = by_source(listing)
    assert listing.layout == "generic" and listing.classes == ["cat", "dog"]
    assert (items["Validation/dog/2.MKV"].split, items["Validation/dog/2.MKV"].label) == ("val", 1)
    assert (items["test/3.webm"].label, items["test/3.webm"].split) == (-1, "test")
    assert items["train/cat/sub/4.avi"].label_name == "cat"
    touch(tmp_path / "b", "cat/1.mp4", "dog/2.mp4", "dog/3.wav", ".hidden/4.mp4")
    listing = list_sources(tmp_path / "b")
    assert listing.dataset == "b" and sorted(by_source(listing)) == ["cat/1.mp4", "dog/2.mp4"]
    assert {i.split for i in listing.items} == {"train"}
    assert sorted(by_source(list_sources(tmp_path / "b", audio_only=True))) == [
        "cat/1.mp4",
        "dog/2.mp4",
        "dog/3.wav",
    ]
    # The output folder inside the source tree is not read back as input.
    touch(tmp_path / "b", "shards/x.mp4")
    assert "shards/x.mp4" not in by_source(list_sources(tmp_path / "b", skip=tmp_path / "b" / "shards"))


def test_bad_file_names_become_error_items(tmp_path: Path) -> None:
    touch(tmp_path, "cls/ok.mp4")
    bad = os.fsencode(tmp_path / "cls") + b"/caf\xe9.mp4"  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write(b"x")
    listing = list_sources(tmp_path)
    errors = [i for i in listing.items if i.error]
    assert len(listing.items) == 2 and len(errors) == 1
    assert errors[0].error.startswith("bad file name") and errors[0].source == "cls/caf\\xe9.mp4"


def test_layout_errors_name_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "ucfTrainTestlist").mkdir()
    with pytest.raises(LayoutError, match="classInd.txt"):
        list_sources(tmp_path, layout="ucf101")
    with pytest.raises(LayoutError, match="not a directory"):
        list_sources(tmp_path / "nope")
    with pytest.raises(LayoutError, match="no Kinetics annotation CSV"):
        list_sources(tmp_path, layout="kinetics")


def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    touch(tmp_path / "elsewhere", "dog/1.mp4")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dog").symlink_to(tmp_path / "elsewhere" / "dog")
    (tmp_path / "elsewhere" / "dog" / "loop").symlink_to(tmp_path / "elsewhere" / "dog")
    assert sorted(by_source(list_sources(tmp_path / "src"))) == ["dog/1.mp4"]
