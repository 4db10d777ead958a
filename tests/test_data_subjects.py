"""Subject ids, overlap and the patient-disjoint split (memscan.data.subjects, memscan split)."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memscan.cli import main
from memscan.data import load_image_set, split_by_subject, subject_overlap
from memscan.data.subjects import default_subject
from memscan.errors import InputError


def _records(n_subjects: int, per_subject: int = 3) -> list[dict]:
    return [
        {"image": f"/x/s{s}_{i}.png", "subject_id": f"s{s}", "set": "all"}
        for s in range(n_subjects)
        for i in range(per_subject)
    ]


def test_split_is_patient_disjoint_and_complete():
    recs = _records(10)
    train, val = split_by_subject(recs, 0.2, seed=0)
    assert len(train) + len(val) == len(recs)
    assert not subject_overlap(train, val)
    assert len({r["subject_id"] for r in val}) == 2
    assert [r for r in recs if r in train] == train  # order kept


def test_split_reproducible_and_order_independent():
    recs = _records(12)
    a = split_by_subject(recs, 0.25, seed=3)
    b = split_by_subject(list(reversed(recs)), 0.25, seed=3)
    assert {r["image"] for r in a[1]} == {r["image"] for r in b[1]}
    seeds = {frozenset(r["subject_id"] for r in split_by_subject(recs, 0.25, seed=s)[1]) for s in range(6)}
    assert len(seeds) > 1  # the seed matters


@pytest.mark.parametrize("fraction, n_val", [(0.01, 1), (0.99, 2)])
def test_split_keeps_both_sides_non_empty(fraction, n_val):
    train, val = split_by_subject(_records(3), fraction, seed=0)
    assert len({r["subject_id"] for r in val}) == n_val and train


@pytest.mark.parametrize("recs, fraction, match", [(_records(1), 0.2, "1 subject"), (_records(4), 1.0, "between 0")])
def test_split_errors(recs, fraction, match):
    with pytest.raises(InputError, match=match):
        split_by_subject(recs, fraction)


def test_default_subject():
    assert default_subject("/a/b/case_01.nii.gz") == "case_01"
    assert default_subject("/a/b/IM0001") == "IM0001"
    assert default_subject("/a/series_dir") == "series_dir"


def test_split_cli_writes_manifests_that_load_back(tiny_2d_folder, tmp_path, capsys):
    folder = tiny_2d_folder(n=12, subjects=6)
    out = tmp_path / "split"
    rc = main(["split", str(folder), "--val-fraction", "0.34", "--seed", "1", "--subject-regex", r"^(s\d+)_",
               "--out", str(out)])
    assert rc == 0
    train, val = pd.read_csv(out / "train.csv", dtype=str), pd.read_csv(out / "val.csv", dtype=str)
    assert list(train.columns[:2]) == ["path", "subject_id"]
    assert len(train) + len(val) == 12
    assert set(val["subject_id"]).isdisjoint(train["subject_id"]) and val["subject_id"].nunique() == 2
    assert "val:   4 image(s) of 2 subject(s)" in capsys.readouterr().out
    again = tmp_path / "again"
    main(["split", str(folder), "--val-fraction", "0.34", "--seed", "1", "--subject-regex", r"^(s\d+)_",
          "--out", str(again)])
    assert (again / "val.csv").read_text() == (out / "val.csv").read_text()
    loaded = load_image_set(out / "val.csv", "val")
    assert sorted(loaded.subjects) == sorted(set(val["subject_id"]))


def test_split_cli_bad_input_exit_2(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    assert main(["split", str(tmp_path / "e"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memscan split: error:") and "no usable images" in err and "Traceback" not in err


@settings(max_examples=60, deadline=None)
@given(
    subjects=st.lists(st.sampled_from([f"p{i}" for i in range(12)]), min_size=2, max_size=40),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_split_properties(subjects, fraction, seed):
    recs = [{"image": f"/x/{i}.png", "subject_id": s} for i, s in enumerate(subjects)]
    if len(set(subjects)) < 2:
        with pytest.raises(InputError):
            split_by_subject(recs, fraction, seed)
        return
    train, val = split_by_subject(recs, fraction, seed)
    assert train and val and not subject_overlap(train, val)
    assert sorted(r["image"] for r in train + val) == sorted(r["image"] for r in recs)
    assert split_by_subject(recs, fraction, seed) == (train, val)
