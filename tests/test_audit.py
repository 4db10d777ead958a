"""Tests for memscan.audit and ``memscan audit``: the whole pipeline on tiny real files (PNG / NIfTI)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.audit import (
    _MARKER,
    ALIGN_DEFORM,
    BENT_FEATURE_SHARE,
    NULL_LOW_RESOLUTION,
    audit,
    authenticity_score,
    data_copying_statistic,
    mann_whitney_u,
)
from memscan.cli import main
from memscan.errors import EXIT_BAD_INPUT, EXIT_GATE, InputError
from memscan.metrics import with_headroom
from memscan.networks import build_encoder

SIZE = 32
REGEX = r"(?P<subject>p\d+)_"
FAST = {"n_bootstrap": 100, "device": "cpu", "batch_size": 8}


def _phantom(seed: int, size: tuple[int, ...]) -> np.ndarray:
    """Smooth anatomy-like phantom: a few Gaussian blobs of seed-dependent position, width and brightness."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij")
    img = np.zeros(size)
    for _ in range(5):
        centre = rng.uniform(-0.6, 0.6, len(size))
        width = rng.uniform(0.05, 0.3)
        img += rng.uniform(0.3, 1.0) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / width)
    img += 0.05 * rng.random(size)
    return (img - img.min()) / (img.max() - img.min())


def _perturb(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.roll(img, 1, axis=0) * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, img.shape)
    return np.clip(out, 0, 1)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.ndim == 2:
        from PIL import Image

        Image.fromarray((img * 255).astype(np.uint8)).save(path)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), str(path))


def make_sets(root: Path, dims: int = 2, n_train: int = 16, n_val: int = 12, n_copies: int = 4, n_new: int = 6,
              name: str = "syn") -> tuple[Path, Path, Path, list[str]]:
    """train / val / synthetic folders; the synthetic set holds perturbed copies of training images + new ones."""
    size = (SIZE,) * 2 if dims == 2 else (16,) * 3
    ext = ".png" if dims == 2 else ".nii.gz"
    train_imgs = [_phantom(i, size) for i in range(n_train)]
    for i, img in enumerate(train_imgs):
        _write(root / "train" / f"p{i // 2}_{i}{ext}", img)
    for i in range(n_val):
        _write(root / "val" / f"p{100 + i // 2}_{i}{ext}", _phantom(1000 + i, size))
    copies = []
    for k in range(n_copies):
        src = (3 * k) % n_train
        _write(root / name / f"copy{k}_of_{src}{ext}", _perturb(train_imgs[src], k))
        copies.append(f"copy{k}_of_{src}{ext}")
    for k in range(n_new):
        _write(root / name / f"new{k}{ext}", _phantom(5000 + k + 100 * len(name), size))
    return root / "train", root / "val", root / name, copies


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("audit2d")
    train, val, syn, copies = make_sets(root)
    # a second synthetic set of only new images, and one corrupt file that must be skipped and listed
    make_sets(root / "other", n_copies=0, n_new=8, name="gan")
    (syn / "broken.png").write_bytes(b"not an image")
    ckpt = root / "random.pt"
    torch.manual_seed(0)
    torch.save(build_encoder(2, "resnet18", 128).state_dict(), ckpt)
    return {"root": root, "train": train, "val": val, "syn": syn, "gan": root / "other" / "gan", "copies": copies,
            "ckpt": ckpt}


@pytest.fixture(scope="module")
def trained(data2d: dict) -> object:
    """The documented default path: no checkpoint, a small encoder trained on the training set (1 epoch)."""
    out = data2d["root"] / "out_trained"
    return audit(data2d["train"], data2d["val"], {"syn": data2d["syn"]}, out_dir=out, epochs=1, image_size=SIZE,
                 subject_regex=REGEX, train_overrides={"arch": "resnet10", "batch_size": 8, "num_workers": 0},
                 **FAST)


def test_trained_audit_writes_every_output(trained: object) -> None:
    out = trained.out_dir
    for name in ("summary.json", "train_matches.csv", "synthetic_matches.csv", "skipped.csv", "report.html",
                 "embeddings/train.npy", "embeddings/val.npy", "embeddings/syn.npy", "embeddings/syn_files.csv",
                 "figures/distributions.png", "figures/copies_syn.png", "figures/borderline_syn.png"):
        assert (out / name).is_file(), name
    assert not (out / _MARKER).exists()  # a finished audit leaves no "interrupted" marker
    summary = json.loads((out / "summary.json").read_text())
    for key in ("threshold", "percentile", "n_train", "n_val", "n_synthetic", "n_memorized_train",
                "frac_memorized_train", "n_copies_synthetic", "frac_copies_synthetic", "null_rate"):
        assert key in summary and key in summary["synthetic_sets"]["syn"]
    assert summary["n_train"] == 16 and summary["n_val"] == 12 and summary["n_synthetic"] == 10
    assert summary["skipped"] == {"train": 0, "val": 0, "syn": 1}
    prov = summary["provenance"]
    assert prov["encoder_source"] == "trained on the training set"
    assert len(prov["checkpoint_sha256"]) == 64 and prov["monai_version"] and prov["torch_version"]
    assert prov["inputs"]["syn"]["n_files"] == 10 and len(prov["inputs"]["train"]["file_list_sha256"]) == 64
    assert prov["config"]["arch"] == "resnet10" and prov["config"]["image_size"] == [SIZE, SIZE]
    from memscan.embed import resolve_precision

    assert prov["config"]["precision"] == resolve_precision("auto", "cpu")  # the resolved precision, not "auto"
    block = summary["synthetic_sets"]["syn"]
    assert block["n_train_subjects"] == 8  # p0..p7, two images each
    assert block["controls"]["n"] == 8 and 0 <= block["controls"]["n_caught"] <= 8
    emb = np.load(out / "embeddings" / "train.npy")
    assert emb.shape[0] == 16
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["path"].map(lambda p: Path(p).name)) == ["broken.png"]


def test_copies_found_with_a_trained_encoder(trained: object) -> None:
    table = pd.read_csv(trained.out_dir / "synthetic_matches.csv")
    assert {"synthetic_set", "path", "train_path", "best_train_correlation", "copy"} <= set(table.columns)
    planted = table[table["path"].str.contains("copy")]
    # every planted copy is matched to the training image it was made from
    for row in planted.itertuples():
        src = int(re.search(r"_of_(\d+)", row.path).group(1))
        assert Path(row.train_path).name.endswith(f"_{src}.png")
    # and the planted copies rank above every new image
    new = table[table["path"].str.contains("new")]
    assert planted["best_train_correlation"].min() > new["best_train_correlation"].max()


def test_resume_reuses_cached_embeddings(trained: object, data2d: dict) -> None:
    out = trained.out_dir
    cache = out / "embeddings" / "cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(before) >= 16 + 12 + 10
    (out / _MARKER).write_text("interrupted")  # what an interrupted audit leaves behind
    (out / "summary.json").unlink()
    again = audit(data2d["train"], data2d["val"], {"syn": data2d["syn"]}, out_dir=out, checkpoint=trained.checkpoint,
                  image_size=SIZE, subject_regex=REGEX, train_overrides={"arch": "resnet10"}, **FAST)
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert {k: after[k] for k in before} == before  # nothing recomputed
    assert again.summary["provenance"]["resumed"] is True
    assert again.threshold == pytest.approx(trained.threshold, abs=1e-6)


def test_refuses_non_empty_output_unless_overwrite(data2d: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        audit(data2d["train"], data2d["val"], data2d["syn"], out_dir=out, checkpoint=data2d["ckpt"],
              image_size=SIZE, **FAST)
    assert (out / "notes.txt").read_text() == "mine"  # nothing lost
    rc = main(["audit", "--train", str(data2d["train"]), "--val", str(data2d["val"]), "--synthetic",
               str(data2d["syn"]), "--checkpoint", str(data2d["ckpt"]), "--image-size", str(SIZE), "--out", str(out),
               "--device", "cpu", "--bootstrap", "50"])
    assert rc == EXIT_BAD_INPUT


def test_cli_two_sets_gate_and_clean_export(data2d: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, clean = tmp_path / "out", tmp_path / "clean"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an older audit: replaced because of --overwrite
    rc = main(["audit", "--overwrite", "--train", str(data2d["train"]), "--val", str(data2d["val"]),
               "--synthetic", str(data2d["syn"]), "--synthetic", str(data2d["gan"]),
               "--synthetic-name", "ldm", "--synthetic-name", "gan", "--checkpoint", str(data2d["ckpt"]),
               "--image-size", str(SIZE), "--subject-regex", REGEX, "--device", "cpu", "--bootstrap", "50",
               "--controls", "4", "--fail-above", "0.1", "--export-clean", str(clean), "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["synthetic_sets"]) == ["ldm", "gan"]
    fracs = {k: v["frac_copies_synthetic"] for k, v in summary["synthetic_sets"].items()}
    assert rc == (EXIT_GATE if max(fracs.values()) > 0.1 else 0)
    assert summary["gate"]["failed"] is (rc == EXIT_GATE)
    assert "[ldm] copies:" in printed and "[gan] copies:" in printed and "report.html" in printed
    table = pd.read_csv(out / "synthetic_matches.csv")
    assert sorted(table["synthetic_set"].unique()) == ["gan", "ldm"]
    # export: one folder per set, exactly the files that are not copies, same names and bytes
    for name, src in (("ldm", data2d["syn"]), ("gan", data2d["gan"])):
        rows = table[table["synthetic_set"] == name]
        expected = sorted(Path(p).name for p in rows.loc[~rows["copy"], "path"])
        assert sorted(p.name for p in (clean / name).iterdir()) == expected
        for fname in expected:
            assert (clean / name / fname).read_bytes() == (src / fname).read_bytes()
    html = (out / "report.html").read_text()
    # no URL anywhere but the embedded images (whose base64 may spell "http" by chance)
    assert "ldm" in html and "gan" in html and "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)


def test_bad_inputs_are_one_line_errors(data2d: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["audit", "--train", str(empty), "--val", str(data2d["val"]), "--synthetic", str(data2d["syn"]),
               "--checkpoint", str(data2d["ckpt"]), "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "Traceback" not in err
    # a checkpoint of another architecture: clear error naming the mismatch
    other = tmp_path / "other.pt"
    torch.save(build_encoder(2, "resnet10", 16).state_dict(), other)
    with pytest.raises(InputError, match="does not fit|shape"):
        audit(data2d["train"], data2d["val"], data2d["syn"], out_dir=tmp_path / "o2", checkpoint=other,
              image_size=SIZE, **FAST)
    with pytest.raises(InputError, match="percentile"):
        audit(data2d["train"], data2d["val"], data2d["syn"], out_dir=tmp_path / "o3", percentile=120)
    with pytest.raises(InputError, match="headroom"):  # before any work: nothing written
        audit(data2d["train"], data2d["val"], data2d["syn"], out_dir=tmp_path / "o3h", headroom=1.0)
    assert not (tmp_path / "o3h").exists()
    with pytest.raises(InputError, match="usable set name"):
        audit(data2d["train"], data2d["val"], {"train": data2d["syn"]}, out_dir=tmp_path / "o4")
    capsys.readouterr()
    rc = main(["audit", "--train", "a", "--val", "b", "--synthetic", "c", "--synthetic-name", "x",
               "--synthetic-name", "y", "--out", str(tmp_path / "o5")])
    assert rc == EXIT_BAD_INPUT and "2 name(s) for 1 --synthetic set(s)" in capsys.readouterr().err
    with pytest.raises(InputError, match="not found"):
        audit(data2d["train"], data2d["val"], data2d["syn"], out_dir=tmp_path / "o6", checkpoint=tmp_path / "no.pt",
              **FAST)


def test_fused_score_flags_exact_and_mirrored_copies(data2d: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    syn = tmp_path / "fused_syn"
    syn.mkdir()
    for src in sorted(data2d["syn"].glob("new*.png")):
        (syn / src.name).write_bytes(src.read_bytes())
    train_file = sorted(data2d["train"].glob("*.png"))[5]
    (syn / "exact.png").write_bytes(train_file.read_bytes())  # a planted exact copy
    Image.fromarray(np.fliplr(np.asarray(Image.open(train_file)))).save(syn / "mirror.png")  # left-right mirror
    out = tmp_path / "out"
    result = audit(data2d["train"], data2d["val"], {"syn": syn}, out_dir=out, checkpoint=data2d["ckpt"],
                   image_size=SIZE, controls=2, subject_regex=REGEX, score="fused", **FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["config"]["score"] == "fused"
    table = result.sets["syn"].synthetic_table
    best = dict(zip(table["path"].map(lambda p: Path(p).name), table["best_train_correlation"]))
    # the fused row is the same for an image and its mirror: both copies correlate 1 with their training image
    assert best["exact.png"] == pytest.approx(1.0, abs=1e-4) and best["mirror.png"] == pytest.approx(1.0, abs=1e-4)
    flagged = set(table.loc[table["copy"].astype(bool), "path"].map(lambda p: Path(p).name))
    assert {"exact.png", "mirror.png"} <= flagged
    # matched features are the fused ones: a quarter-size pixel block beside the 128-d embedding
    assert np.load(out / "embeddings" / "train.npy").shape == (16, (SIZE // 4) ** 2 + 128)
    assert "flip-invariant fused features" in (out / "report.html").read_text()
    # the embedding cache holds the plain and the mirrored embedding of each distinct file content (exact.png
    # shares its training file's entries), never a fused row
    cached = [np.load(f) for f in (out / "embeddings" / "cache").glob("*.npy")]
    assert len(cached) == 2 * (16 + 12 + 7) and all(c.shape == (128,) for c in cached)
    # the paper's embedding score on request
    plain = audit(data2d["train"], data2d["val"], {"syn": syn}, out_dir=tmp_path / "plain", checkpoint=data2d["ckpt"],
                  image_size=SIZE, controls=0, subject_regex=REGEX, precision="float32", score="embedding", **FAST)
    assert plain.summary["provenance"]["config"]["score"] == "embedding"
    assert plain.summary["provenance"]["config"]["precision"] == "float32"
    assert np.load(tmp_path / "plain" / "embeddings" / "train.npy").shape == (16, 128)
    # a bad --score is a one-line error (exit 2) before any work
    capsys.readouterr()
    rc = main(["audit", "--train", str(data2d["train"]), "--val", str(data2d["val"]), "--synthetic", str(syn),
               "--checkpoint", str(data2d["ckpt"]), "--score", "pixels", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "score" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_audit_3d_with_checkpoint(tmp_path: Path) -> None:
    train, val, syn, _ = make_sets(tmp_path, dims=3, n_train=8, n_val=8, n_copies=2, n_new=3)
    ckpt = tmp_path / "enc3d.pt"
    torch.manual_seed(0)
    torch.save(build_encoder(3, "resnet18", 32).state_dict(), ckpt)
    result = audit(train, val, syn, out_dir=tmp_path / "out", checkpoint=ckpt, image_size=16, controls=2,
                   subject_regex=REGEX, **FAST)
    assert result.summary["provenance"]["config"]["spatial_dims"] == 3
    assert result.summary["n_synthetic"] == 5
    assert (tmp_path / "out" / "figures" / "copies_syn.png").is_file()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "six evenly spaced slices" in html


def test_mann_whitney_matches_scipy() -> None:
    st = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, rng.integers(1, 30)).astype(float)
        y = rng.integers(0, 6, rng.integers(1, 30)).astype(float)
        assert mann_whitney_u(x, y)[0] == pytest.approx(st.mannwhitneyu(x, y).statistic)
    with pytest.raises(ValueError):
        mann_whitney_u(np.array([]), np.array([1.0]))


def test_data_copying_and_authenticity_separate_copies_from_new_samples() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    val = rng.normal(size=(100, 16))
    copies = train[:100] + 0.05 * rng.normal(size=(100, 16))
    new = rng.normal(size=(100, 16))
    ct_copies = data_copying_statistic(train, val, copies, device="cpu")
    ct_new = data_copying_statistic(train, val, new, device="cpu")
    assert ct_copies["data_copying_ct"] < -3 < ct_new["data_copying_ct"]
    assert ct_copies["ct_cells_used"] >= 1
    assert authenticity_score(train, copies, device="cpu")["authenticity"] < 0.05
    assert 0.3 < authenticity_score(train, new, device="cpu")["authenticity"] < 0.8
    assert np.isnan(authenticity_score(train[:1], new, device="cpu")["authenticity"])
    # too few samples per cell: no cell qualifies → NaN rather than a made-up number
    assert np.isnan(data_copying_statistic(train, val[:3], new[:3], device="cpu")["data_copying_ct"])


@pytest.mark.parametrize("bundle,dims", [("memscan_cxr_2d", 2), ("memscan_knee_3d", 3)])
def test_bundle_audit_config_runs_the_same_audit(bundle: str, dims: int, tmp_path: Path) -> None:
    from monai.bundle import run

    from memscan.audit import DEFAULT_SCORE, default_headroom

    config = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs" / "audit.json"
    # the bundle's defaults are the audit's: its default score, and null = that score's own headroom
    defaults = json.loads(config.read_text())
    assert defaults["score"] == DEFAULT_SCORE == inspect.signature(audit).parameters["score"].default
    assert defaults["headroom"] is None is inspect.signature(audit).parameters["headroom"].default
    assert default_headroom(DEFAULT_SCORE) == 0.5 and default_headroom("fused") == default_headroom("embedding") == 0
    data = tmp_path / "dataset"
    make_sets(data, dims=dims, n_train=8, n_val=8, n_copies=2, n_new=2, name="synthetic")
    ckpt = tmp_path / "enc.pt"
    torch.manual_seed(0)
    torch.save(build_encoder(dims, "resnet10", 16).state_dict(), ckpt)
    overrides = {"dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "ckpt_path": str(ckpt),
                 "arch": "resnet10", "embedding_dim": 16, "image_size": [SIZE if dims == 2 else 16] * dims,
                 "device": "cpu", "controls": 2, "fail_above": 0.0, "score": "fused" if dims == 3 else "embedding",
                 "headroom": 0.25}
    with pytest.raises(SystemExit) as exc:  # 2 copies in 4 images > 0.0: the release gate exits 3
        run(config_file=str(config), **overrides)
    assert exc.value.code == EXIT_GATE
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance"]["checkpoint"] == str(ckpt)
    assert summary["synthetic_set_names"] == ["synthetic"] and summary["n_synthetic"] == 4
    assert summary["gate"] == {"fail_above": 0.0, "failed": True}
    assert summary["provenance"]["config"]["score"] == ("fused" if dims == 3 else "embedding")
    assert summary["provenance"]["config"]["headroom"] == summary["headroom"] == 0.25
    assert summary["threshold"] == pytest.approx(with_headroom(summary["percentile_threshold"], 0.25), abs=1e-12)
    assert "95th percentile (" in (tmp_path / "out" / "report.html").read_text()  # the report states the rule


def test_alignment_size_per_score() -> None:
    """``aligned`` searches half the input (at most 32² / 16³); ``best-of-aligned`` its pixel Pearson's own grid
    (the input, at most 64² / 32³)."""
    from memscan.audit import alignment_size, best_of_pixel_size

    assert alignment_size([512, 512]) == [32, 32] and alignment_size([48, 40]) == [24, 20]
    assert alignment_size([32, 256, 256]) == [16, 16, 16]
    for shape in ([512, 512], [48, 40], [32, 256, 256], [12, 32, 32]):
        assert alignment_size(shape, "best-of-aligned") == best_of_pixel_size(shape)
    assert alignment_size([512, 512], "best-of-aligned") == [64, 64]
    assert alignment_size([32, 256, 256], "best-of-aligned") == [32, 32, 32]


def test_aligned_score_catches_a_shifted_rotated_copy(data2d: dict, tmp_path: Path) -> None:
    """``score="aligned"``: a copy moved by a shift and a rotation, which the fused features score below an exact
    copy, is re-scored after alignment, matched to its source and flagged; τ, controls and the report use it."""
    from PIL import Image

    syn = tmp_path / "moved_syn"
    syn.mkdir()
    for src in sorted(data2d["syn"].glob("new*.png")):
        (syn / src.name).write_bytes(src.read_bytes())
    train_files = sorted(data2d["train"].glob("*.png"))
    source = train_files[7]
    moved = Image.open(source).rotate(8, resample=Image.BILINEAR)
    Image.fromarray(np.roll(np.asarray(moved), (2, -3), axis=(0, 1))).save(syn / "moved.png")
    out = tmp_path / "aligned"
    result = audit(data2d["train"], data2d["val"], {"syn": syn}, out_dir=out, checkpoint=data2d["ckpt"],
                   image_size=SIZE, controls=2, subject_regex=REGEX, score="aligned", **FAST)
    assert result.summary["provenance"]["config"]["score"] == "aligned"
    table = result.sets["syn"].synthetic_table.set_index(result.sets["syn"].synthetic_table["path"].map(
        lambda p: Path(p).name))
    assert Path(table.loc["moved.png", "train_path"]).name == source.name
    assert bool(table.loc["moved.png", "copy"])
    assert table.loc["moved.png", "best_train_correlation"] > table.drop("moved.png")["best_train_correlation"].max()
    assert result.sets["syn"].block["refined"] is True
    assert result.sets["syn"].block["controls"]["n_caught"] == 2
    assert "--score aligned" in (out / "report.html").read_text()
    fused = audit(data2d["train"], data2d["val"], {"syn": syn}, out_dir=tmp_path / "fused", checkpoint=data2d["ckpt"],
                  image_size=SIZE, controls=0, subject_regex=REGEX, score="fused", **FAST)
    f_table = fused.sets["syn"].synthetic_table
    f_moved = f_table.loc[f_table["path"].map(lambda p: Path(p).name) == "moved.png", "best_train_correlation"]
    assert table.loc["moved.png", "best_train_correlation"] > float(f_moved.iloc[0])


def test_best_of_score_catches_a_blended_copy(data2d: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``score="best-of"``: fused and pixel scores each scaled by its own τ_b, the better one per pair; a training image blended with a validation image (3:1) is matched to its source and
    flagged; the saved features and the summary's τ_b reproduce every score; controls and the report use it."""
    from PIL import Image

    from memscan.metrics import best_of_correlation

    syn = tmp_path / "blend_syn"
    syn.mkdir()
    for src in sorted(data2d["syn"].glob("new*.png")):
        (syn / src.name).write_bytes(src.read_bytes())
    source = sorted(data2d["train"].glob("*.png"))[9]
    other = sorted(data2d["val"].glob("*.png"))[3]
    blend = 0.75 * np.asarray(Image.open(source), np.float64) + 0.25 * np.asarray(Image.open(other), np.float64)
    Image.fromarray(blend.astype(np.uint8)).save(syn / "blend.png")
    (syn / "exact.png").write_bytes(source.read_bytes())
    out = tmp_path / "best_of"
    result = audit(data2d["train"], data2d["val"], {"syn": syn}, out_dir=out, checkpoint=data2d["ckpt"],
                   image_size=SIZE, controls=2, subject_regex=REGEX, score="best-of", **FAST)
    assert result.summary["provenance"]["config"]["score"] == "best-of"
    block = result.sets["syn"].block
    assert len(block["feature_set_thresholds"]) == 2
    table = result.sets["syn"].synthetic_table
    table = table.set_index(table["path"].map(lambda p: Path(p).name))
    for name in ("blend.png", "exact.png"):
        assert Path(table.loc[name, "train_path"]).name == source.name and bool(table.loc[name, "copy"]), name
    assert table.loc["exact.png", "best_train_correlation"] == pytest.approx(1.0, abs=1e-4)  # an exact copy: 1
    assert not table.drop(["blend.png", "exact.png"])["copy"].any()
    emb = {k: np.load(out / "embeddings" / f"{k}.npy") for k in ("train", "syn")}
    pix = {k: np.load(out / "embeddings" / f"{k}_pixels.npy") for k in ("train", "syn")}
    assert pix["train"].shape == (16, SIZE * SIZE) and emb["train"].shape == (16, (SIZE // 4) ** 2 + 128)
    values, indices = best_of_correlation([emb["syn"], pix["syn"]], [emb["train"], pix["train"]],
                                          block["feature_set_thresholds"], device="cpu")
    np.testing.assert_allclose(values, result.sets["syn"].synthetic_table["best_train_correlation"], atol=1e-6)
    np.testing.assert_array_equal(indices, result.sets["syn"].synthetic_table["best_train_index"])
    assert block["controls"]["n_caught"] == 2
    html = (out / "report.html").read_text()
    assert "--score best-of" in html and "ranked by score" in html and "ranked by correlation" not in html
    with pytest.raises(InputError, match="best_of"):
        best_of_correlation([emb["syn"]], [emb["train"], pix["train"]], [0.5], device="cpu")
    # the CLI runs the same score and does not call τ a correlation
    capsys.readouterr()
    rc = main(["audit", "--train", str(data2d["train"]), "--val", str(data2d["val"]), "--synthetic", str(syn),
               "--checkpoint", str(data2d["ckpt"]), "--image-size", str(SIZE), "--subject-regex", REGEX,
               "--score", "best-of", "--controls", "0", "--bootstrap", "0", "--device", "cpu",
               "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert rc == 0 and "best validation best-of score" in printed
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["threshold"] == pytest.approx(
        result.summary["threshold"], abs=1e-6)


def test_checkpoint_settings_come_from_its_encoder_json(trained: object, data2d: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """``--checkpoint RUN/model.pt`` of a non-default encoder (here resnet10) needs no extra flags: the settings
    written beside it at training are used; a sidecar of the wrong dimensionality is a clear input error."""
    ckpt = trained.out_dir / "encoder" / "model.pt"
    assert json.loads((ckpt.with_name("encoder.json")).read_text())["arch"] == "resnet10"
    again = audit(data2d["train"], data2d["val"], {"syn": data2d["syn"]}, out_dir=tmp_path / "again",
                  checkpoint=ckpt, subject_regex=REGEX, controls=0, **FAST)
    config = again.summary["provenance"]["config"]
    assert config["arch"] == "resnet10" and list(config["image_size"]) == [SIZE, SIZE]
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    other.write_bytes(ckpt.read_bytes())
    other.with_name("encoder.json").write_text(json.dumps({"spatial_dims": 3, "arch": "resnet10"}))
    with pytest.raises(InputError, match="3D"):
        audit(data2d["train"], data2d["val"], {"syn": data2d["syn"]}, out_dir=tmp_path / "wrong", checkpoint=other,
              subject_regex=REGEX, controls=0, **FAST)
    other.with_name("encoder.json").write_text("{not json")  # a damaged sidecar: one line naming it
    rc = main(["audit", "--train", str(data2d["train"]), "--val", str(data2d["val"]), "--synthetic",
               str(data2d["syn"]), "--checkpoint", str(other), "--out", str(tmp_path / "damaged")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1 and "encoder.json" in err
    assert "unreadable encoder settings" in err and "Traceback" not in err


def test_single_validation_patient_gives_one_warning(data2d: dict, tmp_path: Path) -> None:
    """One validation patient: the preflight's few-patients warning carries the null-rate consequence too, so
    the summary holds one warning about it, not two."""
    val = tmp_path / "val_one"
    val.mkdir()
    for src in sorted(data2d["val"].glob("p100_*.png")):  # the two images of one patient, renamed apart
        (val / src.name).write_bytes(src.read_bytes())
    for k, src in enumerate(sorted(data2d["val"].glob("*.png"))[2:10]):
        (val / f"p100_x{k}.png").write_bytes(src.read_bytes())
    audit(data2d["train"], val, {"syn": data2d["syn"]}, out_dir=tmp_path / "out", checkpoint=data2d["ckpt"],
          image_size=SIZE, controls=0, subject_regex=REGEX, **FAST)
    warnings = json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"]
    about = [w for w in warnings if "patient" in w and "validation" in w]
    assert len(about) == 1, warnings
    assert about[0].startswith("validation holds 1 patient") and "null rate splits it by image" in about[0]


def _textured(seed: int) -> np.ndarray:
    """A phantom with fine texture (smooth blobs alone have no detail finer than the high-pass of the aligned score)."""
    import torch

    rng = np.random.default_rng(seed)
    texture = torch.nn.functional.interpolate(torch.as_tensor(rng.normal(size=(1, 1, 12, 12))), size=(SIZE, SIZE),
                                              mode="bilinear", align_corners=False)[0, 0].numpy()
    img = _phantom(seed, (SIZE, SIZE)) + 0.5 * texture
    return (img - img.min()) / (img.max() - img.min())


def test_best_of_aligned_score_catches_moved_and_blended_copies(data2d: dict, tmp_path: Path) -> None:
    """``score="best-of-aligned"``: the best of the aligned high-passed pixels, pixel Pearson at two sizes (the
    full-size one against the best blend of two training images) and the fused score, each on its own τ_b; a
    shifted + rotated copy and a blended copy are both matched to their sources and flagged, the moved one by the
    alignment (above its best plain best-of value, which the saved features reproduce); controls and the report use
    the same score. Textured phantoms: the high-pass keeps only their texture."""
    from PIL import Image

    from memscan.metrics import best_of_correlation
    from memscan.scoring import rank_rows, standardize_rows

    for i in range(16):
        _write(tmp_path / "train" / f"p{i // 2}_{i}.png", _textured(i))
    for i in range(12):
        _write(tmp_path / "val" / f"p{100 + i // 2}_{i}.png", _textured(1000 + i))
    syn = tmp_path / "mixed_syn"
    for k in range(6):
        _write(syn / f"new{k}.png", _textured(5000 + k))
    train_files = sorted((tmp_path / "train").glob("*.png"))
    moved = Image.open(train_files[7]).rotate(8, resample=Image.BILINEAR)
    Image.fromarray(np.roll(np.asarray(moved), (2, -3), axis=(0, 1))).save(syn / "moved.png")
    other = sorted((tmp_path / "val").glob("*.png"))[3]
    blend = 0.75 * np.asarray(Image.open(train_files[9]), np.float64) + 0.25 * np.asarray(Image.open(other), np.float64)
    Image.fromarray(blend.astype(np.uint8)).save(syn / "blend.png")
    two = 0.6 * np.asarray(Image.open(train_files[11]), np.float64) + 0.4 * np.asarray(Image.open(train_files[4]),
                                                                                        np.float64)
    Image.fromarray(two.astype(np.uint8)).save(syn / "two.png")  # two training images superimposed
    curved = 255.0 * (np.asarray(Image.open(train_files[13]), np.float64) / 255.0) ** 2.5
    Image.fromarray(curved.astype(np.uint8)).save(syn / "curved.png")  # a strong gamma: its pixel ranks are kept
    out = tmp_path / "best_of_aligned"
    result = audit(tmp_path / "train", tmp_path / "val", {"syn": syn}, out_dir=out, checkpoint=data2d["ckpt"],
                   image_size=SIZE, controls=2, subject_regex=REGEX, score="best-of-aligned", headroom=0.0, **FAST)
    block = result.sets["syn"].block
    taus = block["feature_set_thresholds"]
    # aligned (refined fused), bent (the non-rigid fit of the same candidates), the bent pairs' fused features mixed
    # with their bent score (BENT_FEATURE_SHARE: the fused features count through it alone), pixels, quarter pixels,
    # the full-size pixels' ranks (RANK_PIXELS)
    assert len(taus) == 6 and block["refined"] is True and block["blended_sets"] == [0] and taus[2] != taus[1]
    table = result.sets["syn"].synthetic_table
    # a blend's other training source is named beside the first, or left empty
    seconds = table["second_train_path"].dropna()
    assert set(seconds) <= {str(p) for p in train_files} and (table["second_train_index"] >= 0).sum() == len(seconds)
    table = table.set_index(table["path"].map(lambda p: Path(p).name))
    for name, source in (("moved.png", train_files[7]), ("blend.png", train_files[9]), ("curved.png", train_files[13])):
        assert Path(table.loc[name, "train_path"]).name == source.name and bool(table.loc[name, "copy"]), name
    pix = {k: np.load(out / "embeddings" / f"{k}_pixels.npy") for k in ("train", "syn")}
    quarter = {k: np.load(out / "embeddings" / f"{k}_pixels_{SIZE // 4}x{SIZE // 4}.npy") for k in ("train", "syn")}
    assert pix["train"].shape == (16, SIZE * SIZE) and quarter["train"].shape == (16, (SIZE // 4) ** 2)
    plain, _ = best_of_correlation([pix["syn"], quarter["syn"]], [pix["train"], quarter["train"]], taus[3:5],
                                   blend=[0], device="cpu")
    scores = result.sets["syn"].synthetic_table["best_train_correlation"].to_numpy()
    assert (scores >= plain - 1e-6).all()  # the aligned and bent sets only add to the plain sets' best
    # the pixel parts' null also holds the validation images at lower resolutions (and the full-size one blends of
    # two of them): their τ_b is at least the sharp images' one-image null
    assert result.summary["provenance"]["config"]["null_low_resolution"] == list(NULL_LOW_RESOLUTION)
    def null(stem: str) -> float:
        t, v = (standardize_rows(np.load(out / "embeddings" / f"{k}{stem}.npy").astype(np.float64))
                for k in ("train", "val"))
        return float(np.percentile((t @ v.T).max(axis=1), 95.0))

    assert taus[3] > null("_pixels") and taus[4] >= null(f"_pixels_{SIZE // 4}x{SIZE // 4}") - 1e-6
    # the ranks' τ_b: at least the training images' best Spearman correlation with a sharp validation image
    t_rank, v_rank = (standardize_rows(rank_rows(np.load(out / "embeddings" / f"{k}_pixels.npy")))
                      for k in ("train", "val"))
    assert taus[5] >= float(np.percentile((t_rank.astype(np.float64) @ v_rank.T).max(axis=1), 95.0)) - 1e-6
    assert result.summary["provenance"]["config"]["rank_pixels"] is True
    recorded = json.loads(json.dumps(ALIGN_DEFORM[2]))  # the non-rigid fit's settings, as summary.json holds them
    assert result.summary["provenance"]["config"]["deform"] == {**recorded, "feature_share": BENT_FEATURE_SHARE[2]}
    curved_row = int(np.flatnonzero(table.index == "curved.png")[0])
    assert scores[curved_row] > plain[curved_row] + 0.05  # the ranks score the gamma copy nearer an exact one
    moved_row = int(np.flatnonzero(table.index == "moved.png")[0])
    assert scores[moved_row] > plain[moved_row] + 1e-3
    assert block["controls"]["n_caught"] == 2
    html = (out / "report.html").read_text()
    assert "--score best-of-aligned" in html and "blended with" in html  # the pairs table names a blend's other source
    sources = {Path(table.loc["two.png", k]).name for k in ("train_path", "second_train_path")}
    assert sources == {train_files[11].name, train_files[4].name} and bool(table.loc["two.png", "copy"])
    assert "other training source after it (blue frame)" in html  # its gallery shows both sources


@pytest.mark.parametrize("size", [32, 96])
def test_best_of_aligned_pixel_sets_are_the_images_at_each_grid(tiny_2d_folder, size: int) -> None:
    """``score="best-of-aligned"``'s pixel sets are the preprocessed images area-downsampled to each of
    :func:`best_of_pixel_sizes`, standardised: at 32² the quarter grid is the fused pixels' own (8², taken from them),
    at 96² it is not (16² against the fused 24²), and both paths give the same features as a direct computation."""
    from memscan.audit import _low_resolution_pixels, _preprocessed_image, _score_features, best_of_pixel_sizes
    from memscan.data import PreprocessConfig, load_image_set, preprocess_transforms
    from memscan.data.transforms import LOWRES_ZOOM_RANGE, low_resolution
    from memscan.scoring import pixel_features, rank_rows, standardize_rows

    records = load_image_set(tiny_2d_folder(n=4, size=(40, 44)), "images").records
    pre = preprocess_transforms(PreprocessConfig(spatial_dims=2, spatial_size=size))
    torch.manual_seed(0)
    net = build_encoder(2, "resnet10", embedding_dim=8).eval()
    found = _score_features(net, records, pre, score="best-of-aligned", image_size=[size, size], batch_size=2,
                            device="cpu", cache_dir=None, checkpoint_sha256=None, precision="float32")
    grids = best_of_pixel_sizes([size, size], "best-of-aligned")
    assert grids[1] == [max(1, n // 4) for n in grids[0]] and len(found.pixels) == 3
    images = np.stack([_preprocessed_image(pre, r) for r in records])
    for got, grid in zip(found.pixels, grids):
        np.testing.assert_allclose(got, standardize_rows(pixel_features(images, grid)), rtol=1e-5, atol=1e-6)
    # last, the full-size pixels' ranks within each image (RANK_PIXELS), standardised
    np.testing.assert_allclose(found.pixels[2], standardize_rows(rank_rows(pixel_features(images, grids[0]))),
                               rtol=1e-5, atol=1e-6)
    assert found.aligned.shape == (4, 1, *grids[0])
    # the null views of the same pixel sets: each image at each zoom of its resolution, then the same grids
    views = _low_resolution_pixels(records, pre, grids, NULL_LOW_RESOLUTION)
    assert [len(v) for v in views] == [len(NULL_LOW_RESOLUTION)] * 3
    for per_zoom, grid, ranks in zip(views, grids + grids[:1], (False, False, True)):
        for got, zoom in zip(per_zoom, NULL_LOW_RESOLUTION):
            low = pixel_features(np.stack([low_resolution(x, zoom) for x in images]), grid)
            np.testing.assert_allclose(got, standardize_rows(rank_rows(low) if ranks else low), rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[0][1], found.pixels[0], atol=1e-3)  # a quarter of the resolution is not the image
    assert NULL_LOW_RESOLUTION == (LOWRES_ZOOM_RANGE[1], LOWRES_ZOOM_RANGE[0])  # the training view's two ends


def test_aligned_refine_memo_aligns_calibration_pairs_once(monkeypatch) -> None:
    """Several synthetic sets share one train → validation alignment (``memo``); pairs with a synthetic image, and a
    different set of rows, are aligned anew."""
    import memscan.scoring
    from memscan.audit import _aligned_refine

    calls = []
    real = memscan.scoring.align_and_correlate

    def counting(query_images, *args, **kwargs):
        calls.append(len(query_images))
        return real(query_images, *args, **kwargs)

    monkeypatch.setattr(memscan.scoring, "align_and_correlate", counting)
    rng = np.random.default_rng(0)
    images = {k: rng.random((4, 1, 16, 16)).astype(np.float32) for k in ("train", "val", "synthetic")}
    cand, values = np.array([[0, 1]] * 4), np.full((4, 2), 0.5)
    memo: dict = {}
    first = _aligned_refine(images, {"device": "cpu"}, memo)("train", np.arange(4), "val", cand, values)
    again = _aligned_refine(images, {"device": "cpu"}, memo)("train", np.arange(4), "val", cand, values)
    assert len(calls) == 1 and all(np.array_equal(a, b) for a, b in zip(first, again))
    _aligned_refine(images, {"device": "cpu"}, memo)("train", np.arange(3), "val", cand[:3], values[:3])
    for _ in range(2):
        _aligned_refine(images, {"device": "cpu"}, memo)("synthetic", np.arange(4), "train", cand, values)
    assert len(calls) == 4 and len(memo) == 2


def test_aligned_refine_adds_the_non_rigid_score_of_the_aligned_winners():
    """With a ``deform`` entry, the refine's second column is deform_and_correlate on the k candidates the rigid
    alignment scored highest, not the first k by feature correlation."""
    from memscan.audit import _aligned_refine
    from memscan.scoring import align_and_correlate, deform_and_correlate

    rng = np.random.default_rng(0)
    images = {"train": rng.random((4, 1, 24, 24)).astype(np.float32),
              "synthetic": rng.random((3, 1, 24, 24)).astype(np.float32)}
    images["synthetic"][0] = images["train"][1]  # its source is its second candidate
    cand = np.array([[0, 1], [2, 3], [1, 0]])
    values = np.full(cand.shape, 0.5)
    deform = {"spacing": 8.0, "iterations": 5}
    score, index = _aligned_refine(images, {"plane": (-2, -1), "device": "cpu", "deform": {**deform, "k": 1}})(
        "synthetic", np.arange(3), "train", cand, values)
    assert score.shape == index.shape == (3, 2)
    rigid = align_and_correlate(images["synthetic"], images["train"], cand, feature_scores=values, device="cpu")
    assert rigid.index[0] == 1
    bent = deform_and_correlate(images["synthetic"], images["train"], rigid.index[:, None], device="cpu", **deform)
    np.testing.assert_allclose(score[:, 0], rigid.score)
    np.testing.assert_allclose(score[:, 1], bent.score)
    np.testing.assert_array_equal(index[:, 1], rigid.index)
    first = deform_and_correlate(images["synthetic"][:1], images["train"], cand[:1, :1], device="cpu", **deform)
    assert score[0, 1] > 0.9 > 0.5 > first.score[0]  # the copy bent onto its source, not onto its first candidate
    plain = _aligned_refine(images, {"plane": (-2, -1), "device": "cpu"})("synthetic", np.arange(3), "train", cand,
                                                                        values)
    assert plain[0].shape == (3,)


def test_aligned_refine_shortlist_aligns_a_deep_source_and_bends_only_the_retrievals_own() -> None:
    """With a ``shortlist`` (:data:`memscan.audit.ALIGN_SHORTLIST`) the refine aligns the retrieval's first
    :data:`memscan.audit.ALIGN_CANDIDATES` and the quick alignment's best of the rest: a copy cropped and enlarged by
    a quarter, its source 10th of 12, is found; the non-rigid fit still bends only the first ones. The audit retrieves
    the shortlist's depth for it."""
    from monai.transforms import Resize

    from memscan.audit import (ALIGN_CANDIDATES, ALIGN_SHORTLIST, _aligned_refine, _retrieval_depth,
                               _score_align_axes)

    rng = np.random.default_rng(3)
    smooth = torch.nn.functional.interpolate(torch.as_tensor(rng.normal(size=(12, 1, 10, 10)), dtype=torch.float32),
                                             size=(32, 32), mode="bilinear", align_corners=False).numpy()
    crop = np.asarray(Resize(spatial_size=(32, 32), mode="bilinear")(smooth[9][:, 3:29, 2:28]), dtype=np.float32)
    images = {"train": smooth, "synthetic": np.stack([crop, smooth[1]])}
    cand, values = np.tile(np.arange(12), (2, 1)), np.tile(np.linspace(0.9, 0.3, 12), (2, 1))
    axes = {"plane": (-2, -1), "flip_axes": (), "device": "cpu", "weights": {"pixel": 1.0, "features": 0.0},
            "highpass": 1.0, "deform": {"spacing": 8.0, "iterations": 5, "k": ALIGN_CANDIDATES}}
    short = {**axes, "shortlist": {"depth": 12, "extra": 2, "factor": 2, "highpass": 0.5}}
    score, index = _aligned_refine(images, short)("synthetic", np.arange(2), "train", cand, values)
    plain, plain_index = _aligned_refine(images, axes)("synthetic", np.arange(2), "train", cand[:, :ALIGN_CANDIDATES],
                                                       values[:, :ALIGN_CANDIDATES])
    assert index[0, 0] == 9 and score[0, 0] > 0.95 > 0.8 > plain[0, 0]  # found only through the shortlist
    assert 0 <= index[0, 1] < ALIGN_CANDIDATES  # the fit bent the retrieval's own candidates, as without it
    np.testing.assert_allclose(score[:, 1], plain[:, 1])
    assert index[1, 0] == 1 and score[1, 0] > 0.99  # an exact copy among the first ones stays found
    for dims in (2, 3):
        expect = (ALIGN_SHORTLIST[dims] or {}).get("depth", ALIGN_CANDIDATES)
        assert _retrieval_depth(_score_align_axes("best-of-aligned", {}, dims)) == expect
        assert _retrieval_depth(_score_align_axes("aligned", {}, dims)) == ALIGN_CANDIDATES


def test_aligned_refine_bends_the_bands_best_of_the_whole_retrieval_list() -> None:
    """With ``band_k`` in ``deform`` (:data:`memscan.audit.ALIGN_DEFORM`) the fit also bends the retrieval's candidates
    whose band-passed pixels correlate best with the query (:func:`memscan.scoring.bend_candidates`), from the whole
    list the refine was given, not only the shortlist's: a warped copy whose source the shortlist dropped is bent onto
    it, and the mixed third column takes that pair's feature correlation from the retrieval's values."""
    from monai.transforms import Rand2DElastic

    from memscan.audit import _aligned_refine

    rng = np.random.default_rng(5)
    smooth = torch.nn.functional.interpolate(torch.as_tensor(rng.normal(size=(8, 1, 8, 8)), dtype=torch.float32),
                                             size=(32, 32), mode="bilinear", align_corners=False).numpy()
    warp = Rand2DElastic(spacing=8, magnitude_range=(1.5, 1.5), prob=1.0, padding_mode="border")
    warp.set_random_state(seed=2)
    images = {"train": smooth, "synthetic": np.stack([np.asarray(warp(smooth[5]), dtype=np.float32), smooth[2]])}
    cand, values = np.tile(np.arange(8), (2, 1)), np.tile(np.linspace(0.9, 0.2, 8), (2, 1))
    deform = {"spacing": 8.0, "iterations": 30, "optimizer": "lbfgs", "max_step": 0.3, "k": 1, "feature_share": 0.2}
    axes = {"plane": (-2, -1), "flip_axes": (), "device": "cpu", "weights": {"pixel": 1.0, "features": 0.0},
            "highpass": 1.0, "shortlist": {"depth": 8, "extra": 0, "keep": 2}}  # the source is 6th: not aligned
    rigid, rigid_index = _aligned_refine(images, {**axes, "deform": deform})("synthetic", np.arange(2), "train", cand,
                                                                            values)
    score, index = _aligned_refine(images, {**axes, "deform": {**deform, "band_k": 1, "band": (1.0, 4.0)}})(
        "synthetic", np.arange(2), "train", cand, values)
    assert rigid_index[0, 1] in (0, 1) and index[0, 1] == 5 and score[0, 1] > rigid[0, 1] + 0.2
    assert index[0, 2] == 5 and np.isclose(score[0, 2], 0.2 * values[0, 5] + 0.8 * score[0, 1])
    np.testing.assert_allclose(score[:, 0], rigid[:, 0])  # the rigid column as without the band
    assert index[1, 1] == 2 and score[1, 1] > 0.99  # an exact copy among the aligned ones stays found


def test_aligned_refine_mixes_the_bent_pairs_feature_correlation_in_a_third_column():
    """With ``feature_share`` in ``deform`` (:data:`memscan.audit.BENT_FEATURE_SHARE`), a third column: each bent
    pair's feature correlation (the refine's ``values``, looked up by candidate) mixed with its bent score in that
    share, the best per query; a query without candidates keeps -inf and index -1."""
    from memscan.audit import _aligned_refine, _candidate_values
    from memscan.scoring import align_and_correlate, deform_and_correlate

    rng = np.random.default_rng(1)
    images = {"train": rng.random((4, 1, 24, 24)).astype(np.float32),
              "synthetic": rng.random((3, 1, 24, 24)).astype(np.float32)}
    images["synthetic"][1] = images["train"][3]
    cand = np.array([[0, 2, 1], [2, 3, 0], [-1, -1, -1]])
    values = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.6], [-np.inf] * 3])
    deform = {"spacing": 8.0, "iterations": 5}
    axes = {"plane": (-2, -1), "device": "cpu", "deform": {**deform, "k": 2, "feature_share": 0.25}}
    score, index = _aligned_refine(images, axes)("synthetic", np.arange(3), "train", cand, values)
    assert score.shape == index.shape == (3, 3)
    two = _aligned_refine(images, {**axes, "deform": {**deform, "k": 2}})("synthetic", np.arange(3), "train", cand,
                                                                        values)
    np.testing.assert_allclose(score[:, :2], two[0])  # the first two columns as without the share
    # the pairs the fit bent: the alignment's best two of each row
    found = align_and_correlate(images["synthetic"], images["train"], cand, feature_scores=values, device="cpu",
                                plane=(-2, -1))
    chosen = found.ranked()[:, :2]
    bent = deform_and_correlate(images["synthetic"], images["train"], chosen, device="cpu", **deform)
    looked_up = _candidate_values(cand, values, chosen)
    for r in range(2):
        expect = [0.25 * values[r][list(cand[r]).index(c)] + 0.75 * p for c, p in zip(chosen[r], bent.pixel[r])]
        np.testing.assert_allclose(looked_up[r], [values[r][list(cand[r]).index(c)] for c in chosen[r]])
        assert score[r, 2] == pytest.approx(max(expect)) and index[r, 2] == chosen[r][int(np.argmax(expect))]
    assert score[1, 2] > 0.75 and index[1, 2] == 3  # the copy, bent onto its source
    assert score[2, 2] == -np.inf and index[2, 2] == -1
