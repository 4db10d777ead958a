"""Layouts (folder, manifest, NIH ChestX-ray14, MRNet-v1.0) and bad input through load_image_set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memscan.data import detect_layout, load_image_set
from memscan.data.discovery import SKIPPED_COLUMNS
from memscan.errors import InputError

from conftest import make_array, write_nifti, write_png

# ------------------------------------------------------------------------------------------------ folder / manifest


def test_folder_recursive_sorted_with_stem_subjects(tmp_path):
    write_png(tmp_path / "b" / "deep" / "z.png", make_array((16, 16), 1))
    write_png(tmp_path / "a.png", make_array((16, 16), 2))
    (tmp_path / ".hidden.png").write_bytes(b"ignored dotfile")
    images = load_image_set(tmp_path, "train")
    assert images.paths == [str(tmp_path / "a.png"), str(tmp_path / "b" / "deep" / "z.png")]
    assert [r["subject_id"] for r in images.records] == ["a", "z"]
    assert all(r["set"] == "train" for r in images.records)
    assert images.layout == "folder" and len(images.skipped) == 0
    assert list(images.skipped.columns) == SKIPPED_COLUMNS


def test_manifest_relative_paths_subjects_and_extra_columns(tmp_path):
    write_png(tmp_path / "imgs" / "x1.png", make_array((16, 16), 1))
    write_png(tmp_path / "imgs" / "x2.png", make_array((16, 16), 2))
    abs_path = write_png(tmp_path / "elsewhere" / "x3.png", make_array((16, 16), 3))
    csv = tmp_path / "lists" / "train.csv"
    csv.parent.mkdir()
    pd.DataFrame(
        {
            "path": ["../imgs/x1.png", "../imgs/x2.png", str(abs_path), "../imgs/missing.png"],
            "subject_id": ["P1", "P1", "", "P4"],
            "label": ["a", "b", "c", "d"],
        }
    ).to_csv(csv, index=False)
    images = load_image_set(csv, "train")
    assert images.layout == "manifest"
    assert [r["subject_id"] for r in images.records] == ["P1", "P1", "x3"]  # empty cell -> file stem
    assert [r["label"] for r in images.records] == ["a", "b", "c"]
    assert images.records[0]["image"] == str(csv.parent / "../imgs/x1.png")
    assert images.subjects == ["P1", "x3"]
    row = images.skipped.iloc[0]
    assert row["reason"].startswith("file not found") and row["row"] == 4 and row["set"] == "train"


def test_manifest_excel_bom_and_capitalised_columns(tmp_path):
    write_png(tmp_path / "a.png", make_array((16, 16), 1))
    (tmp_path / "m.csv").write_bytes("Path,Subject_ID\na.png,P7\n".encode("utf-8-sig"))
    assert load_image_set(tmp_path / "m.csv", "x").records[0]["subject_id"] == "P7"


def test_manifest_without_path_column(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("file,subject_id\na.png,1\n")
    with pytest.raises(InputError, match="needs a 'path' column"):
        load_image_set(csv, "train")


def test_folder_with_manifest_csv_is_manifest(tmp_path):
    write_png(tmp_path / "a.png", make_array((16, 16), 1))
    (tmp_path / "manifest.csv").write_text("path,subject_id\na.png,S9\n")
    assert detect_layout(tmp_path) == "manifest"
    assert load_image_set(tmp_path, "x").records[0]["subject_id"] == "S9"


def test_subject_regex(tmp_path):
    write_png(tmp_path / "pat01" / "scan_a.png", make_array((16, 16), 1))
    write_png(tmp_path / "pat01" / "scan_b.png", make_array((16, 16), 2))
    write_png(tmp_path / "pat02" / "scan_a.png", make_array((16, 16), 3))
    write_png(tmp_path / "other" / "scan_c.png", make_array((16, 16), 4))
    images = load_image_set(tmp_path, "train", subject_regex=r"^(?P<subject>pat\d+)/")
    assert [r["subject_id"] for r in images.records] == ["pat01", "pat01", "pat02"]
    assert "does not match" in images.skipped.iloc[0]["reason"]
    with pytest.raises(InputError, match="capture group"):
        load_image_set(tmp_path, "train", subject_regex=r"pat\d+")
    with pytest.raises(InputError, match="invalid regular expression"):
        load_image_set(tmp_path, "train", subject_regex=r"(")


# ------------------------------------------------------------------------------------------------ NIH ChestX-ray14

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)


def _nih(root: Path, with_lists: bool = True) -> Path:
    """NIH ChestX-ray14 as published: Data_Entry_2017.csv, images_001/images/*.png, official split lists."""
    rows = [
        ("00000001_000.png", "Cardiomegaly", 0, 1, "images_001"),
        ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "images_001"),
        ("00000002_000.png", "No Finding", 0, 2, "images_001"),
        ("00000003_000.png", "Hernia", 0, 3, "images_002"),
        ("00000004_000.png", "Mass|Nodule", 0, 4, None),  # listed, image not downloaded
    ]
    lines = [NIH_HEADER]
    for k, (name, labels, follow, pid, folder) in enumerate(rows):
        lines.append(f"{name},{labels},{follow},{pid},58,M,PA,2682,2749,0.143,0.143,\n")
        if folder:
            write_png(root / folder / "images" / name, make_array((24, 24), k))
    write_png(root / "images_002" / "images" / "00000099_000.png", make_array((24, 24), 50))  # not in CSV
    (root / "Data_Entry_2017.csv").write_text("".join(lines))
    if with_lists:
        (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000004_000.png\n")
        (root / "test_list.txt").write_text("00000002_000.png\n00000003_000.png\n")
    return root


def test_nih_layout_all(tmp_path):
    root = _nih(tmp_path / "nih")
    assert detect_layout(root) == "nih"
    images = load_image_set(root, "train")
    assert [Path(p).name for p in images.paths] == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
        "00000003_000.png",
    ]
    assert [r["subject_id"] for r in images.records] == ["1", "1", "2", "3"]
    assert images.records[1]["finding_labels"] == "Cardiomegaly|Emphysema"
    assert images.records[0]["view_position"] == "PA"
    reasons = dict(zip(images.skipped["path"].map(lambda p: Path(p).name), images.skipped["reason"]))
    assert "not found under images*/" in reasons["00000004_000.png"]
    assert "not listed in Data_Entry_2017.csv" in reasons["00000099_000.png"]


def test_nih_official_splits(tmp_path):
    root = _nih(tmp_path / "nih")
    train = load_image_set(root, "train", layout="nih", split="train_val")
    test = load_image_set(root / "Data_Entry_2017.csv", "val", split="test")
    assert [Path(p).name for p in train.paths] == ["00000001_000.png", "00000001_001.png"]
    assert [Path(p).name for p in test.paths] == ["00000002_000.png", "00000003_000.png"]
    assert not set(train.subjects) & set(test.subjects)
    with pytest.raises(InputError, match="split must be one of"):
        load_image_set(root, "x", split="valid")


def test_nih_split_without_list_is_error(tmp_path):
    root = _nih(tmp_path / "nih", with_lists=False)
    with pytest.raises(InputError, match="test_list.txt"):
        load_image_set(root, "val", split="test")


# ------------------------------------------------------------------------------------------------ MRNet-v1.0


def _mrnet(root: Path) -> Path:
    """MRNet-v1.0 as published: {train,valid}/{axial,coronal,sagittal}/NNNN.npy + {split}-{task}.csv (no header)."""
    cases = {"train": ["0000", "0001", "0002"], "valid": ["1130", "1131"]}
    for k, (split, ids) in enumerate(cases.items()):
        for plane in ("axial", "coronal", "sagittal"):
            (root / split / plane).mkdir(parents=True)
            for j, case in enumerate(ids):
                n_slices = 5 + j  # MRNet exams differ in slice count
                np.save(root / split / plane / f"{case}.npy", make_array((n_slices, 16, 16), 10 * k + j))
        for t, task in enumerate(("abnormal", "acl", "meniscus")):
            lines = "".join(f"{case},{(i + t) % 2}\n" for i, case in enumerate(ids))
            (root / f"{split}-{task}.csv").write_text(lines)
    return root


def test_mrnet_layout_plane_split_labels(tmp_path):
    root = _mrnet(tmp_path / "MRNet-v1.0")
    assert detect_layout(root) == "mrnet"
    train = load_image_set(root, "train", split="train", plane="coronal")
    assert [Path(p).name for p in train.paths] == ["0000.npy", "0001.npy", "0002.npy"]
    assert all("/train/coronal/" in p for p in train.paths)
    assert train.spatial_dims == 3 and set(train.shapes) == {(5, 16, 16), (6, 16, 16), (7, 16, 16)}
    assert [r["subject_id"] for r in train.records] == ["0000", "0001", "0002"]
    assert [r["acl"] for r in train.records] == ["1", "0", "1"]
    valid = load_image_set(root / "valid", "val")  # the split folder itself, default sagittal
    assert [r["subject_id"] for r in valid.records] == ["1130", "1131"]
    assert all("/valid/sagittal/" in p for p in valid.paths)
    both = load_image_set(root, "all", plane="axial")
    assert len(both) == 5
    with pytest.raises(InputError, match="plane"):
        load_image_set(root, "x", plane="oblique")


# ------------------------------------------------------------------------------------------------ bad input


def _bad_folder(root: Path) -> dict[str, str]:
    """A 2D set holding one of every bad-input case; returns file name -> expected reason fragment."""
    write_png(root / "good1.png", make_array((16, 16), 1))
    write_png(root / "good2.png", make_array((16, 16), 2))
    write_png(root / "zz_dup_of_good1.png", make_array((16, 16), 1))
    (root / "empty.png").write_bytes(b"")
    full = (root / "good1.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(64))
    (root / "notes.png").write_text("this is not an image\n")
    (root / "readme.txt").write_text("hello")
    write_png(root / "constant.png", np.full((16, 16), 7, np.uint8))
    nan = make_array((16, 16), 3, "float32")
    nan[2, 3] = np.nan
    np.save(root / "nan.npy", nan)
    inf = make_array((16, 16), 4, "float32")
    inf[0, 0] = np.inf
    np.save(root / "inf.npy", inf)
    write_nifti(root / "volume.nii.gz", make_array((8, 8, 8), 5, "float32"))
    return {
        "zz_dup_of_good1.png": "exact duplicate of",
        "empty.png": "empty file (0 bytes)",
        "truncated.png": "cannot read as pil image",
        "corrupt.nii.gz": "cannot read as nifti image",
        "notes.png": "cannot read as pil image",
        "readme.txt": "unsupported format '.txt'",
        "constant.png": "constant image (every pixel = 7)",
        "nan.npy": "contains NaN/Inf pixels (1 of 256)",
        "inf.npy": "contains NaN/Inf pixels",
        "volume.nii.gz": "3D image (shape (8, 8, 8)) in a 2D set",
    }


def test_bad_inputs_skipped_with_reasons(tmp_path, caplog):
    expected = _bad_folder(tmp_path / "set")
    with caplog.at_level("WARNING", logger="memscan.data"):
        images = load_image_set(tmp_path / "set", "synthetic_a")
    assert sorted(Path(p).name for p in images.paths) == ["good1.png", "good2.png"]
    got = dict(zip(images.skipped["path"].map(lambda p: Path(p).name), images.skipped["reason"]))
    assert set(got) == set(expected)
    for name, fragment in expected.items():
        assert fragment in got[name], (name, got[name])
    assert (images.skipped["set"] == "synthetic_a").all()
    # one log line per skipped file, naming file and reason
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == len(expected)
    assert any("empty.png: empty file (0 bytes)" in line for line in lines)


def test_skipped_csv_row(tmp_path):
    from memscan.data import check_sources

    _bad_folder(tmp_path / "syn")
    write_png(tmp_path / "train" / "t.png", make_array((16, 16), 20))
    write_png(tmp_path / "val" / "v.png", make_array((16, 16), 21))
    report = check_sources(tmp_path / "train", tmp_path / "val", [tmp_path / "syn"])
    path = report.write_skipped(tmp_path / "out")
    frame = pd.read_csv(path)
    assert list(frame.columns) == SKIPPED_COLUMNS
    row = frame[frame["path"].str.endswith("empty.png")].iloc[0]
    assert row["set"] == "syn" and row["reason"] == "empty file (0 bytes)"


def test_strict_mode_raises_on_first_problem(tmp_path):
    _bad_folder(tmp_path / "set")
    with pytest.raises(InputError, match="strict mode; 9 more problem"):
        load_image_set(tmp_path / "set", "train", strict=True)


def test_strict_manifest_error_names_row(tmp_path):
    write_png(tmp_path / "a.png", make_array((16, 16), 1))
    (tmp_path / "m.csv").write_text("path\na.png\nnope.png\n")
    with pytest.raises(InputError) as info:
        load_image_set(tmp_path / "m.csv", "train", strict=True)
    assert info.value.row == 2 and "nope.png (row 2): file not found" in str(info.value)


def test_unreadable_permission(tmp_path, monkeypatch):
    # tests run as root, where chmod 000 does not stop reads: simulate the failed access check instead
    write_png(tmp_path / "a.png", make_array((16, 16), 1))
    locked = write_png(tmp_path / "locked.png", make_array((16, 16), 2))
    real_access = os.access
    monkeypatch.setattr(
        "memscan.data.readers.os.access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    images = load_image_set(tmp_path, "train")
    assert images.skipped.iloc[0]["reason"] == "permission denied (file is not readable)"


def test_empty_set_is_error(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="no usable images .*empty file"):
        load_image_set(tmp_path / "set", "val")
    with pytest.raises(InputError, match="not found"):
        load_image_set(tmp_path / "missing", "val")


def test_mixed_dims_majority_and_tie(tmp_path):
    write_png(tmp_path / "m" / "a.png", make_array((16, 16), 1))
    write_png(tmp_path / "m" / "b.png", make_array((16, 16), 2))
    write_nifti(tmp_path / "m" / "c.nii.gz", make_array((8, 8, 8), 3, "float32"))
    images = load_image_set(tmp_path / "m", "x")
    assert images.spatial_dims == 2 and len(images) == 2
    assert load_image_set(tmp_path / "m", "x", spatial_dims=3).spatial_dims == 3
    (tmp_path / "m" / "b.png").unlink()
    with pytest.raises(InputError, match="mixes 2D and 3D"):
        load_image_set(tmp_path / "m", "x")


def test_dicom_series_sharing_folder_is_reported(tmp_path):
    from conftest import write_dicom_series

    write_dicom_series(tmp_path / "d", make_array((3, 8, 8), 1, "uint16"))
    write_png(tmp_path / "d" / "stray.png", make_array((8, 8), 2))
    images = load_image_set(tmp_path / "d", "x")
    assert [Path(p).name for p in images.paths] == ["stray.png"]
    assert (images.skipped["reason"].str.contains("put each series in its own folder")).sum() == 3


def test_mhd_raw_companion_not_reported(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(make_array((4, 8, 8), 1, "float32")), str(tmp_path / "v.mhd"))
    assert any(p.suffix in (".raw", ".zraw") for p in tmp_path.iterdir())
    (tmp_path / "orphan.raw").write_bytes(b"\0" * 16)
    images = load_image_set(tmp_path, "x")
    assert [Path(p).name for p in images.paths] == ["v.mhd"]
    assert list(images.skipped["path"].map(lambda p: Path(p).name)) == ["orphan.raw"]


def test_dicomdir_reported_and_series_kept(tmp_path):
    from conftest import write_dicom_series

    write_dicom_series(tmp_path / "study" / "series1", make_array((3, 8, 8), 1, "uint16"), patient_id="P5")
    write_dicom_series(tmp_path / "study" / "series2", make_array((4, 8, 8), 2, "uint16"), patient_id="P5")
    (tmp_path / "study" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    images = load_image_set(tmp_path / "study", "x")
    assert images.spatial_dims == 3 and [Path(p).name for p in images.paths] == ["series1", "series2"]
    assert images.subjects == ["P5"]
    assert "DICOMDIR index file" in images.skipped.iloc[0]["reason"]


def test_files_validated_once_per_process(tmp_path, monkeypatch):
    import memscan.data.readers as readers

    write_png(tmp_path / "a.png", make_array((16, 16), 1))
    write_png(tmp_path / "b.png", make_array((16, 16), 2))
    calls = []
    real = readers.probe_image
    monkeypatch.setattr(readers, "probe_image", lambda p: calls.append(Path(p).name) or real(p))
    load_image_set(tmp_path, "train")
    load_image_set(tmp_path, "again")
    assert sorted(calls) == ["a.png", "b.png"]
    write_png(tmp_path / "b.png", make_array((20, 20), 3))  # changed file: validated again
    os.utime(tmp_path / "b.png", ns=(1, 10**18))
    again = load_image_set(tmp_path, "third")
    assert sorted(calls) == ["a.png", "b.png", "b.png"] and (20, 20) in again.shapes
