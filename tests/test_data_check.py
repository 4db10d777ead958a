"""Preflight checks (memscan.data.check, memscan check)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from memscan.cli import main
from memscan.data import check_sets, check_sources, load_image_set
from memscan.errors import InputError

from conftest import SUBJECT_REGEX, make_array, write_png


def test_clean_sets_usable(tiny_2d_folder):
    train, val, syn = tiny_2d_folder(n=19), tiny_2d_folder(n=10), tiny_2d_folder(n=4)
    report = check_sources(train, val, {"ldm": syn})
    assert report.usable and not report.warnings and not report.errors
    text = report.to_text()
    assert "train set: 19 image(s), 2D, 19 subject(s), 0 skipped" in text
    assert "synthetic set 'ldm': 4 image(s)" in text and "shapes:   32×32 (10)" in text
    assert text.endswith("result: usable")
    summary = report.summary()
    assert summary["sets"]["ldm"]["n_images"] == 4 and summary["usable"] is True
    json.dumps(summary)


def test_patient_and_content_overlap_warnings(tiny_2d_folder):
    train = tiny_2d_folder(n=10, subjects=5)
    val = tiny_2d_folder(n=10, subjects=5)  # same subject ids s0..s4, different pixels
    shutil.copy(sorted(train.glob("s0_0_*.png"))[0], val / "s0_copied_from_train.png")
    report = check_sets(
        load_image_set(train, "train", subject_regex=SUBJECT_REGEX),
        load_image_set(val, "val", subject_regex=SUBJECT_REGEX),
        {},
    )
    assert report.usable  # warnings, not errors
    subj = [w for w in report.warnings if "subject(s) appear in both" in w]
    assert subj and subj[0].startswith("5 subject(s)")
    same = [w for w in report.warnings if "pixel-identical" in w]
    assert same and same[0].startswith("1 validation image(s)") and "copied_from_train.png" in same[0]
    assert "WARNING: 5 subject(s) appear in both training and validation" in report.to_text()


def test_synthetic_exact_copies_noted(tiny_2d_folder, tmp_path):
    train, val = tiny_2d_folder(n=10), tiny_2d_folder(n=10)
    syn = tmp_path / "syn"
    syn.mkdir()
    for p in sorted(train.glob("*.png"))[:3]:
        shutil.copy(p, syn / f"gen_{p.name}")
    report = check_sources(train, val, [syn])
    assert report.notes == ["synthetic set 'syn': 3 image(s) are pixel-identical to training images (exact copies)"]


def test_unusable_when_set_empty_or_dims_differ(tiny_2d_folder, tiny_3d_folder, tmp_path):
    train, val = tiny_2d_folder(n=10), tiny_3d_folder(n=3)
    report = check_sources(train, val)
    assert not report.usable and "sets mix 2D and 3D" in report.errors["dimensions"]
    (tmp_path / "empty").mkdir()
    report = check_sources(train, tmp_path / "empty")
    assert not report.usable and "no usable images" in report.errors["val"]
    assert "val set: NOT USABLE" in report.to_text()
    with pytest.raises(InputError):
        check_sources(train, tmp_path / "empty", strict=True)


def test_check_cli_exit_codes_and_outputs(tiny_2d_folder, tmp_path, capsys):
    train, val, syn = tiny_2d_folder(n=10), tiny_2d_folder(n=10), tiny_2d_folder(n=3)
    (syn / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["check", "--train", str(train), "--val", str(val), "--synthetic", str(syn),
               "--synthetic", str(syn), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"synthetic set '{syn.name}'" in text and f"synthetic set '{syn.name}_2'" in text
    assert "broken.png: empty file (0 bytes)" in text
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 2 and set(skipped["reason"]) == {"empty file (0 bytes)"}
    assert json.loads((out / "check.json").read_text())["usable"] is True
    rc = main(["check", "--train", str(train), "--val", str(val), "--synthetic", str(syn), "--strict"])
    captured = capsys.readouterr()
    assert rc == 2 and "broken.png: empty file (0 bytes) (strict mode)" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_check_cli_not_usable_exit_2(tiny_2d_folder, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    write_png(tmp_path / "nothing" / "flat.png", make_array((8, 8), 1) * 0)
    rc = main(["check", "--train", str(tiny_2d_folder(n=10)), "--val", str(tmp_path / "nothing")])
    assert rc == 2 and "result: NOT usable" in capsys.readouterr().out


def test_few_validation_patients_warned(tiny_2d_folder):
    from memscan.data.check import MIN_VAL_SUBJECTS

    train = tiny_2d_folder(n=10)
    few = tiny_2d_folder(n=10, subjects=MIN_VAL_SUBJECTS - 1)
    enough = tiny_2d_folder(n=10, subjects=MIN_VAL_SUBJECTS)
    warned = check_sets(load_image_set(train, "train", subject_regex=SUBJECT_REGEX),
                        load_image_set(few, "val", subject_regex=SUBJECT_REGEX), {})
    quiet = check_sets(load_image_set(train, "train", subject_regex=SUBJECT_REGEX),
                       load_image_set(enough, "val", subject_regex=SUBJECT_REGEX), {})
    assert warned.usable
    assert [w for w in warned.warnings if w.startswith(f"validation holds {MIN_VAL_SUBJECTS - 1} patient(s)")]
    assert not [w for w in quiet.warnings if "validation holds" in w]
    assert not [w for w in warned.warnings if "single patient" in w]  # that clause is for one patient only


def test_few_training_images_warned(tiny_2d_folder):
    """τ is the 95th percentile of one value per training image: under 19 of them, a new image exceeds them all with
    chance 1/(n + 1) > 5%, and the check says so with the numbers."""
    from memscan.data.check import MIN_TRAIN_IMAGES

    val = load_image_set(tiny_2d_folder(n=10, subjects=5), "val", subject_regex=SUBJECT_REGEX)
    few = check_sets(load_image_set(tiny_2d_folder(n=MIN_TRAIN_IMAGES - 1), "train", subject_regex=SUBJECT_REGEX),
                     val, {})
    enough = check_sets(load_image_set(tiny_2d_folder(n=MIN_TRAIN_IMAGES), "train", subject_regex=SUBJECT_REGEX),
                        val, {})
    assert few.usable
    said = [w for w in few.warnings if w.startswith(f"set 'train' has only {MIN_TRAIN_IMAGES - 1} image(s)")]
    assert said and f"1/{MIN_TRAIN_IMAGES} = 5%" in said[0]
    assert not [w for w in enough.warnings if w.startswith("set 'train'")]
