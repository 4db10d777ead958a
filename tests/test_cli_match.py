"""Tests for ``memscan match``: outputs, the printed summary and one-line errors (exit 2) for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.cli import main
from memscan.metrics import match

D = 16


@pytest.fixture()
def sets(tmp_path: Path) -> dict[str, Path]:
    """Train (.npy), validation (.npz) and synthetic (.pt) embeddings; 3 synthetic samples copy training rows."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, D)).astype(np.float32)
    val = rng.normal(size=(50, D))
    syn = np.concatenate([rng.normal(size=(27, D)), train[[3, 10, 20]] + 1e-4 * rng.normal(size=(3, D))])
    np.save(tmp_path / "train.npy", train)
    np.savez(tmp_path / "val.npz", embeddings=val)
    torch.save(torch.as_tensor(syn, dtype=torch.float32), tmp_path / "syn.pt")
    return {"train": tmp_path / "train.npy", "val": tmp_path / "val.npz", "syn": tmp_path / "syn.pt"}


def argv(sets: dict[str, Path], out: Path, *extra: str, **override: Path) -> list[str]:
    files = {**sets, **override}
    return ["match", "--train-emb", str(files["train"]), "--val-emb", str(files["val"]), "--synthetic-emb",
            str(files["syn"]), "--out", str(out), "--device", "cpu", *extra]


def test_match_cli_writes_results(sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(argv(sets, out, "--bootstrap", "200", "--seed", "4", "--percentile", "99")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert 3 <= len(printed) <= 5
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "synthetic_matches.csv", "train_matches.csv"]
    summary = json.loads((out / "summary.json").read_text())
    train = np.load(sets["train"])
    val = np.load(sets["val"])["embeddings"]
    syn = torch.load(sets["syn"], weights_only=True).numpy()
    expected = match(train, val, syn, 99.0, device="cpu", n_bootstrap=200, seed=4).summary
    assert summary == json.loads(json.dumps(expected))  # same numbers as the Python API
    assert summary["n_copies_synthetic"] >= 3 and summary["percentile"] == 99.0
    assert summary["memscan_version"] and len(summary["threshold_ci95"]) == 2
    assert f"{summary['n_copies_synthetic']}/30" in "\n".join(printed)
    syn_table = pd.read_csv(out / "synthetic_matches.csv")
    assert list(syn_table.columns) == ["synthetic_index", "best_train_index", "correlation",
                                       "best_validation_correlation", "margin", "copy"]
    assert syn_table["best_train_index"].tolist()[-3:] == [3, 10, 20] and syn_table["copy"].tolist()[-3:] == [True] * 3
    train_table = pd.read_csv(out / "train_matches.csv")
    assert list(train_table.columns) == ["train_index", "best_synthetic_index", "correlation", "memorized"]
    assert len(train_table) == 60


def _save(path: Path, array) -> Path:
    np.save(path, array)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    np.save(path, np.random.default_rng(0).normal(size=(100, D)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _with_row(path: Path, row: int, value: float | None) -> Path:
    x = np.random.default_rng(1).normal(size=(8, D))
    x[row] = value if value is not None else 2.5  # None: constant row
    if value is not None:
        x[row, 1:] = np.random.default_rng(2).normal(size=D - 1)
    return _save(path, x)


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str, int | None]] = {
    # name: (maker(tmp_path) -> bad file, message fragment, expected row)
    "missing": (lambda d: d / "nope.npy", "file not found", None),
    "nan_row": (lambda d: _with_row(d / "nan.npy", 5, np.nan), "NaN or Inf", 5),
    "inf_row": (lambda d: _with_row(d / "inf.npy", 2, np.inf), "NaN or Inf", 2),
    "constant_row": (lambda d: _with_row(d / "const.npy", 4, None), "zero variance", 4),
    "wrong_dim": (lambda d: _save(d / "dim.npy", np.random.default_rng(0).normal(size=(5, D + 1))),
                  "does not match", None),
    "empty": (lambda d: _save(d / "empty.npy", np.zeros((0, D))), "no samples", None),
    "one_d": (lambda d: _save(d / "flat.npy", np.arange(D, dtype=float)), "2-D", None),
    "three_d": (lambda d: _save(d / "cube.npy", np.ones((2, 3, D))), "2-D", None),
    "pickle_npy": (lambda d: _save(d / "obj.npy", np.array([{"a": 1}], dtype=object)), "pickled", None),
    "pickle_npz": (lambda d: (np.savez(d / "obj.npz", a=np.array([{"a": 1}], dtype=object)), d / "obj.npz")[1],
                   "pickled", None),
    "pickle_pt": (lambda d: (torch.save(torch.nn.Linear(2, 2), d / "mod.pt"), d / "mod.pt")[1], "pickled", None),
    "dict_pt": (lambda d: (torch.save({"w": torch.ones(3, D)}, d / "dict.pt"), d / "dict.pt")[1],
                "single tensor", None),
    "two_arrays_npz": (lambda d: (np.savez(d / "two.npz", a=np.ones((2, D)), b=np.ones((2, D))), d / "two.npz")[1],
                       "exactly one array", None),
    "corrupt_npy": (lambda d: _write(d / "junk.npy", b"not numpy at all"), "not a .npy", None),
    "corrupt_npz": (lambda d: _write(d / "junk.npz", b"not a zip"), "not a .npz", None),
    "corrupt_pt": (lambda d: _write(d / "junk.pt", b"garbage"), "not a torch", None),
    "truncated_npy": (lambda d: _truncated(d / "cut.npy"), "corrupt or unreadable", None),
    "strings": (lambda d: _save(d / "str.npy", np.array([["a", "b"], ["c", "d"]])), "real numbers", None),
    "wrong_suffix": (lambda d: _write(d / "emb.csv", b"1,2\n3,4\n"), "unsupported file type", None),
}


@pytest.mark.parametrize("slot", ["train", "val", "syn"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case: str, slot: str, sets: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    if case == "wrong_dim" and slot == "train":
        slot = "val"  # the first file sets the dimension; the error names the later file
    maker, fragment, row = BAD_INPUTS[case]
    bad = maker(tmp_path)
    out = tmp_path / "out"
    code = main(argv(sets, out, "--bootstrap", "0", **{slot: bad}))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("memscan match: error: ") and str(bad) in lines[0] and fragment in lines[0]
    if row is not None:
        assert f"(row {row})" in lines[0]
    if case == "wrong_dim":
        assert str(sets["train"]) in lines[0]  # names both files
    assert "Traceback" not in captured.err and not out.exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--percentile", "150"], "percentile"),
    (["--headroom", "1"], "headroom"),
    (["--bootstrap", "-5"], "n_bootstrap"),
    (["--device", "tpu"], "device"),
])
def test_bad_options_exit_2(extra: list[str], fragment: str, sets: dict[str, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    assert main(argv(sets, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_headroom_is_the_python_apis(sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(argv(sets, out, "--bootstrap", "50", "--headroom", "0.5")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headroom"] == 0.5 and summary["threshold"] > summary["percentile_threshold"]
    assert first.startswith(f"τ = {summary['threshold']:.4f}")
    assert f"95th percentile ({summary['percentile_threshold']:.4f}) + 0.5 of the way to 1" in first
    assert summary["n_copies_synthetic"] >= 3  # the three near-copies clear the raised threshold


def test_unwritable_out_is_one_line(sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(argv(sets, blocker / "out", "--bootstrap", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder" in err[0]


def test_real_process_prints_no_traceback(sets: dict[str, Path], tmp_path: Path) -> None:
    bad = _with_row(tmp_path / "nan.npy", 3, np.nan)
    proc = subprocess.run([sys.executable, "-m", "memscan", *argv(sets, tmp_path / "out", syn=bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"memscan match: error: {bad} (row 3): embedding contains NaN or Inf"


def test_match_cli_subjects_and_ids(sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Subject files exclude same-patient pairs exactly as the Python API; id files name the table rows."""
    train = np.load(sets["train"])
    val = np.load(sets["val"])["embeddings"]
    syn = torch.load(sets["syn"], weights_only=True).numpy()
    val[:5] = train[:5] + 1e-3  # the same patients' other scans in the validation set: they would set τ
    np.savez(sets["val"], embeddings=val)
    t_subj = [f"p{i}" for i in range(60)]
    v_subj = [f"p{i}" for i in range(5)] + [f"q{i}" for i in range(45)]
    (tmp_path / "train_subjects.txt").write_text("\n".join(t_subj) + "\n")
    pd.DataFrame({"image": [f"v{i}.png" for i in range(50)], "subject": v_subj}).to_csv(tmp_path / "val.csv",
                                                                                      index=False)
    pd.DataFrame({"index": range(60), "image": [f"t{i}.png" for i in range(60)]}).to_csv(tmp_path / "t.files.csv",
                                                                                       index=False)
    out = tmp_path / "out"
    assert main(argv(sets, out, "--bootstrap", "0", "--train-subjects", str(tmp_path / "train_subjects.txt"),
                     "--val-subjects", str(tmp_path / "val.csv"), "--train-ids", str(tmp_path / "t.files.csv"))) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = match(train, val, syn, device="cpu", n_bootstrap=0, train_subjects=t_subj, val_subjects=v_subj)
    without = match(train, val, syn, device="cpu", n_bootstrap=0)
    assert summary["threshold"] == pytest.approx(expected.summary["threshold"])
    assert summary["threshold"] < without.summary["threshold"]  # the same-patient near-copies no longer set τ
    assert (out / "train_matches.csv").read_text().count("t59.png") == 1
    capsys.readouterr()
    (tmp_path / "short.txt").write_text("a\nb\n")
    assert main(argv(sets, tmp_path / "out2", "--train-subjects", str(tmp_path / "short.txt"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "short.txt" in err[0] and "2 labels for 60" in err[0]
    assert main(argv(sets, tmp_path / "out3", "--val-subjects", str(tmp_path / "t.files.csv"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column named subject" in err[0]


def test_match_cli_best_of_feature_sets(sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--best-of T2 V2 S2``: the same result as ``match(best_of=...)``; a copy only the second set sees is flagged;
    a second set with the wrong row count is a one-line error (exit 2)."""
    rng = np.random.default_rng(1)
    extra = {"train": rng.normal(size=(60, 8)), "val": rng.normal(size=(50, 8)), "syn": rng.normal(size=(30, 8))}
    extra["syn"][0] = extra["train"][7] + 1e-4 * rng.normal(size=8)  # seen by the second set only
    paths = {}
    for key, arr in extra.items():
        paths[key] = tmp_path / f"{key}_pixels.npy"
        np.save(paths[key], arr)
    out = tmp_path / "best"
    rc = main(argv(sets, out, "--bootstrap", "0", "--best-of", str(paths["train"]), str(paths["val"]),
                   str(paths["syn"])))
    printed = capsys.readouterr().out
    assert rc == 0 and "best validation best-of score" in printed
    loaded = [np.load(sets["train"]), np.load(sets["val"])["embeddings"], torch.load(sets["syn"]).numpy()]
    ref = match(*loaded, device="cpu", n_bootstrap=0, best_of=[(extra["train"], extra["val"], extra["syn"])])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == pytest.approx(ref.threshold, abs=1e-9)
    assert summary["feature_set_thresholds"] == pytest.approx(ref.summary["feature_set_thresholds"], abs=1e-9)
    table = pd.read_csv(out / "synthetic_matches.csv")
    assert bool(table.loc[0, "copy"]) and table.loc[0, "best_train_index"] == 7
    assert set(np.flatnonzero(table["copy"])) >= {0, 27, 28, 29}

    np.save(paths["val"], extra["val"][:-1])
    rc = main(argv(sets, tmp_path / "bad", "--best-of", str(paths["train"]), str(paths["val"]), str(paths["syn"])))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(paths["val"]) in err and "49 rows but --val-emb has 50" in err
