"""Smoke test of the detection benchmark (benchmarks/detection): perturbations, scoring loop, real-data builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import GaussianSmooth

from benchmarks.detection import build, evaluate, perturb, presets


def _blobs(n: int, seed: int, shape=(16, 16)) -> np.ndarray:
    """Smooth random images in [0, 1] (distinct, non-constant)."""
    rng = np.random.default_rng(seed)
    smooth = GaussianSmooth(sigma=2.0)
    out = [np.asarray(smooth(torch.as_tensor(rng.random((1, *shape), dtype=np.float32)))) for _ in range(n)]
    out = np.stack(out)
    lo, hi = out.min(axis=tuple(range(1, out.ndim)), keepdims=True), out.max(axis=tuple(range(1, out.ndim)),
                                                                             keepdims=True)
    return ((out - lo) / (hi - lo)).astype(np.float32)


@pytest.mark.parametrize("shape", [(16, 16), (6, 12, 12)])
def test_every_family_keeps_shape_and_range(shape):
    x = _blobs(4, 0, shape)
    for family, strength in perturb.settings():
        y = perturb.perturb(x, family, strength, seed=3)
        assert y.shape == x.shape and y.dtype == np.float32, family
        assert y.min() >= 0.0 and y.max() <= 1.0, family
        np.testing.assert_array_equal(y, perturb.perturb(x, family, strength, seed=3))  # replayable
    np.testing.assert_array_equal(perturb.perturb(x, "exact", "-"), x)
    np.testing.assert_array_equal(perturb.perturb(x, "hflip", "-"), x[..., ::-1])
    assert not np.allclose(perturb.perturb(x, "noise_blur", "strong"), x)
    with pytest.raises(ValueError, match="unknown setting"):
        perturb.perturb(x, "nope", "weak")


def test_score_case_pixel_and_tiny_encoder():
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(8, 10 + i) for i in range(3)}}
    tiny = {**presets.PAPER, "encoder": {**presets.PAPER["encoder"], "widths": [4, 8, 8, 8], "embedding_dim": 8,
                                          "steps": 2, "batch_size": 8}}
    scores = evaluate.score_case(case, {"pixel": presets.PIXEL, "tiny": tiny}, 2, ["exact", "hflip"],
                                 log=lambda *_: None)
    assert set(scores.columns) >= {"perm", "detector", "family", "label", "score", "tau"}
    assert scores["perm"].nunique() == 2 and np.isfinite(scores["score"]).all()
    summary = evaluate.summarize(scores).set_index(["detector", "family"])
    # an exact copy has correlation 1 with its source: perfectly separated, always above τ
    assert summary.loc[("pixel", "exact"), "auroc"] == 1.0
    assert summary.loc[("pixel", "exact"), "recall"] == 1.0
    assert {"overall", "exact", "hflip"} <= set(summary.loc["tiny"].index)


def test_permutations_rotate_subjects():
    perms = evaluate.permutations(["a", "b", "c"], 6)
    assert len(set(perms)) == 6
    assert {p[0] for p in perms[:3]} == {"a", "b", "c"}


@pytest.mark.skipif(not (build.DEFAULT_ROOT / "cxr").is_dir(), reason="shared real data not present")
def test_cxr_case_groups_by_patient():
    groups = build.cxr_images(build.DEFAULT_ROOT, size=16)
    assert sum(len(v) for v in groups.values()) == 16
    assert all(v.shape[1:] == (1, 16, 16) and 0.0 <= v.min() and v.max() <= 1.0 for v in groups.values())


def test_default_detector_is_memscans_default():
    """presets.DEFAULT follows the package: the training preset's views and temperature, the audit's default score."""
    import inspect

    from memscan.audit import FUSED_WEIGHTS, audit
    from memscan.training import PRESETS

    score = inspect.signature(audit).parameters["score"].default
    assert presets.DEFAULT_SCORE == score and presets.DEFAULT == presets.MEMSCAN_SCORES[score]
    for dims in (2, 3):
        enc = presets.recipe_for(presets.DEFAULT, dims)["encoder"]
        assert enc["augment"] == "memscan:" + PRESETS["default"][dims]["augment"]
        assert enc["temperature"] == PRESETS["default"][dims]["temperature"]
        assert enc["embedding_dim"] == min(128, PRESETS["default"][dims]["embedding_dim"])
    fused = presets.MEMSCAN_SCORES["fused"]
    assert fused["tta_flip"] and fused["pixel"] == [[4, FUSED_WEIGHTS["pixel"]]]
    assert fused["embedding_weight"] == FUSED_WEIGHTS["embedding"]
    assert not presets.MEMSCAN_SCORES["embedding"]["pixel"] and not presets.MEMSCAN_SCORES["embedding"]["tta_flip"]


@pytest.mark.parametrize("shape", [(16, 16), (6, 12, 12)])
def test_memscan_default_views_in_the_benchmark(shape):
    from benchmarks.detection import detectors

    views = detectors.view_transform("memscan:default", len(shape), shape, seed=0)
    img = torch.as_tensor(_blobs(1, 0, shape)[0])
    v1, v2 = views(img)
    assert v1.shape == v2.shape == img.shape and not torch.equal(v1, v2)


def test_scores_of_one_encoder_share_its_training(monkeypatch):
    from benchmarks.detection import detectors

    calls = []
    real = detectors.train_contrastive
    monkeypatch.setattr(detectors, "train_contrastive", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny = {"widths": [4, 8, 8, 8], "embedding_dim": 8, "steps": 1, "batch_size": 8}
    recipes = {name: {**r, "encoder": {**r["encoder"], **tiny}} for name, r in presets.MEMSCAN_SCORES.items()}
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(6, 20 + i) for i in range(3)}}
    scores = evaluate.score_case(case, recipes, 1, ["exact"], log=lambda *_: None)
    assert len(calls) == 1 and set(scores["detector"]) == {"embedding", "fused"}
    by = scores.groupby("detector")["score"].apply(np.asarray)
    assert not np.allclose(by["embedding"], by["fused"])  # same encoder, different scores


def test_score_case_with_alignment():
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(8, 20 + i, (24, 24)) for i in range(3)}}
    aligned_pixel = {**presets.PIXEL, "align": {**presets.ALIGN, "factor": 1}}
    tiny = {**presets.CANDIDATES["memscan_default_aligned_emb"]}
    tiny["encoder"] = {**tiny["encoder"], "widths": [4, 8, 8, 8], "embedding_dim": 8, "steps": 2, "batch_size": 8}
    scores = evaluate.score_case(case, {"pixel": presets.PIXEL, "aligned": aligned_pixel, "tiny": tiny}, 1,
                                 ["exact", "shift_rotate"], log=lambda *_: None)
    summary = evaluate.summarize(scores).set_index(["detector", "family"])
    assert summary.loc[("aligned", "exact"), "recall"] == 1.0
    # re-aligning the shifted / rotated copies separates them at least as well as raw pixels
    assert summary.loc[("aligned", "shift_rotate"), "auroc"] >= summary.loc[("pixel", "shift_rotate"), "auroc"]
    assert np.isfinite(scores.loc[scores.detector == "tiny", "score"]).all()
    # τ is the null of the same search (each training image against the validation subject), not the plain one
    assert scores.loc[scores.detector == "aligned", "tau"].iloc[0] > scores.loc[scores.detector == "pixel",
                                                                                 "tau"].iloc[0]
