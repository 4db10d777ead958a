"""``memscan demo``: builds planted copies from the real demo data, audits them and reports what it caught."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from memscan.audit import build_demo
from memscan.cli import main
from memscan.errors import EXIT_BAD_INPUT

FAST = ["--epochs", "1", "--bootstrap", "100", "--controls", "2", "--device", "cpu"]


def _counts(printed: str, label: str) -> tuple[int, int]:
    m = re.search(rf"{label}: (\d+) of (\d+)", printed)
    assert m, printed
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("dims,size,extra", [(2, "32", ()), (3, "32 32 8", ()), (2, "32", ("--score", "fused"))])
def test_demo_reports_planted_copies_against_the_truth(dims: int, size: str, extra: tuple[str, ...], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--dims", str(dims), "--image-size", *size.split(), *FAST, *extra])
    printed = capsys.readouterr().out
    assert rc == 0
    report = out / "audit" / "report.html"
    assert report.is_file() and f"report: {report}" in printed
    caught, planted = _counts(printed, "planted copies caught")
    flagged, unseen = _counts(printed, "unseen-subject images wrongly flagged")
    # the printed numbers are the audit's flags scored against the ground truth written beside the inputs
    truth = pd.read_csv(out / "inputs" / "truth.csv")
    table = pd.read_csv(out / "audit" / "synthetic_matches.csv")
    table["file"] = table["path"].map(lambda p: Path(p).name)
    merged = truth.merge(table, on="file")
    assert len(merged) == len(truth) == planted + unseen
    assert caught == int(merged.loc[merged["kind"] == "planted copy", "copy"].sum())
    assert flagged == int(merged.loc[merged["kind"] == "unseen subject", "copy"].sum())
    assert planted >= 2 and unseen >= 4
    # train and validation are different people; the unseen subject is neither
    summary = pd.read_json(out / "audit" / "summary.json", typ="series")
    assert summary["n_train"] > 0 and summary["n_val"] > 0
    # the false-alarm rate τ stands for is promised only where enough training images set it (the 3D demo has 4)
    from memscan.data.check import MIN_TRAIN_IMAGES

    few = summary["n_train"] < MIN_TRAIN_IMAGES
    assert few == (dims == 3)
    assert ("cannot promise 5%" if few else "expected false-alarm rate is") in printed
    config = summary["provenance"]["config"]
    # the default is best-of-aligned with its headroom; another score falls back to the paper's τ
    assert (config["score"], config["headroom"]) == (("fused", 0.0) if extra else ("best-of-aligned", 0.5))


def test_demo_reruns_into_its_own_folder_but_not_a_foreign_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    rc = main(["demo", "--out", str(foreign), "--image-size", "32", *FAST])
    assert rc == EXIT_BAD_INPUT and "not a previous memscan demo" in capsys.readouterr().err
    assert (foreign / "thesis.txt").read_text() == "keep me"
    rc = main(["demo", "--out", str(tmp_path / "new"), "--headroom", "1", *FAST])  # before any input is built
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1 and "headroom" in err[0] and not (tmp_path / "new").exists()
    # a previous 2D demo: a 3D one would resume its encoder; refused before its inputs are replaced
    earlier = tmp_path / "earlier"
    (earlier / "inputs").mkdir(parents=True)
    (earlier / "inputs" / "truth.csv").write_text("file,kind,source\n")
    (earlier / "audit" / "encoder").mkdir(parents=True)
    (earlier / "audit" / "encoder" / "encoder.json").write_text('{"spatial_dims": 2, "arch": "resnet10"}')
    rc = main(["demo", "--out", str(earlier), "--dims", "3", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1 and "holds a 2D demo" in err[0] and "--out" in err[0], err
    assert sorted(p.name for p in (earlier / "inputs").iterdir()) == ["truth.csv"]


def test_build_demo_plants_perturbed_copies(tmp_path: Path) -> None:
    inputs = build_demo(tmp_path, spatial_dims=2, n_copies=3, n_unseen=5)
    assert sorted(inputs.truth["kind"].value_counts().items()) == [("planted copy", 3), ("unseen subject", 5)]
    files = sorted(p.name for p in inputs.synthetic.iterdir())
    assert files == sorted(inputs.truth["file"]) and all(f.startswith("sample_") for f in files)
    # planted copies are perturbed (not byte-identical to their source), unseen images are the real files
    from memscan.data import demo_data_dir

    for row in inputs.truth.itertuples():
        src = (demo_data_dir() / row.source).read_bytes()
        same = (inputs.synthetic / row.file).read_bytes() == src
        assert same is (row.kind == "unseen subject")
