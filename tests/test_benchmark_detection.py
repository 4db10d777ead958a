"""Smoke test of the detection benchmark (benchmarks/detection): perturbations, scoring loop, real-data builder."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
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
    # the stricter operating points come from the same null: τ ≤ its 99th percentile ≤ its maximum
    per = scores.groupby(["detector", "perm"])[["tau", "tau_p99", "tau_p100"]].first()
    assert (per["tau"] <= per["tau_p99"]).all() and (per["tau_p99"] <= per["tau_p100"]).all()
    assert (per["tau"] < per["tau_p100"]).any()
    assert {"overall", "exact", "hflip"} <= set(summary.loc["tiny"].index)


def test_seed_table_pools_seeds_per_family():
    def summary(auroc_exact: float, recall_exact: float) -> pd.DataFrame:
        return pd.DataFrame({"detector": ["a", "a", "b", "b"], "family": ["exact", "overall"] * 2,
                             "auroc": [auroc_exact, 0.9, 1.0, 0.95], "recall": [recall_exact, 0.8, 1.0, 0.9],
                             "fpr": [0.1, 0.2, 0.0, 0.04]})

    table = evaluate.seed_table({0: summary(0.98, 0.9), 3: summary(1.0, 1.0)}, ["a", "b"]).splitlines()
    assert table[0] == "| family | a AUROC mean ± sd (worst) / recall | b AUROC mean ± sd (worst) / recall |"
    # mean 0.99, sample sd of (0.98, 1.0), the worst seed, mean recall
    assert table[2] == "| exact | 0.990 ± 0.014 (0.980) / 0.95 | 1.000 ± 0.000 (1.000) / 1.00 |"
    assert table[-2] == "| overall recall / FPR at τ, mean ± sd | 0.80 ± 0.00 / 0.20 ± 0.00 | 0.90 ± 0.00 / 0.04 ± 0.00 |"
    strict = {0: summary(0.98, 0.9).assign(recall=0.5, fpr=0.0), 3: summary(1.0, 1.0).assign(recall=0.7, fpr=0.02)}
    strict_table = evaluate.seed_table({0: summary(0.98, 0.9), 3: summary(1.0, 1.0)}, ["a", "b"], {"τ at p99": strict})
    assert strict_table.splitlines()[-2] == ("| overall recall / FPR at τ at p99, mean ± sd | 0.60 ± 0.14 / 0.01 ± 0.01 | "
                                      "0.60 ± 0.14 / 0.01 ± 0.01 |")
    assert table[-1] == "| families at AUROC ≥ 0.99, per seed | 0, 1 | 1, 1 |"  # "overall" is not a family


def test_fpr_at_recall_reads_tau_off_the_copies():
    copies, unseen = np.arange(20) / 20 + 0.5, np.arange(10) / 10  # copies 0.50 … 1.45, unseen 0.0 … 0.9
    scores = pd.DataFrame({"detector": "a", "perm": 0, "label": [1] * 20 + [0] * 10,
                           "score": np.concatenate([copies, unseen])})
    out = evaluate.fpr_at_recall(scores, 0.95)
    # 19 of 20 copies kept: τ is the second-lowest copy (0.55); unseen 0.6 … 0.9 lie above it
    assert out.loc[0, "tau_oracle"] == pytest.approx(0.55) and out.loc[0, "fpr"] == pytest.approx(0.4)
    assert evaluate.fpr_at_recall(scores, 1.0).loc[0, "fpr"] == pytest.approx(0.5)  # τ = 0.50 flags 0.5 … 0.9
    oracle = {0: out.assign(detector="a"), 1: out.assign(fpr=0.2)}
    summary = pd.DataFrame({"detector": ["a"] * 2, "family": ["exact", "overall"], "auroc": [1.0, 1.0],
                            "recall": [1.0, 1.0], "fpr": [0.0, 0.0]})
    row = evaluate.seed_table({0: summary, 1: summary}, ["a"], oracle=oracle).splitlines()[-2]
    assert row == "| FPR at the τ giving recall 0.95 (oracle), mean ± sd (worst permutation) | 0.30 ± 0.14 (0.40) |"


def test_operating_points_and_rates_table():
    scores = pd.DataFrame({"detector": "a", "perm": 0, "family": "exact", "label": [1, 1, 0, 0],
                           "score": [0.9, 0.7, 0.65, 0.3], "tau": 0.6, "tau_p99": 0.62, "tau_p100": 0.66})
    points = evaluate.operating_points(scores)
    assert list(points) == ["τ at p99", "τ at p100", "τ + 0.25 (1 − τ)", "τ + 0.5 (1 − τ)"]
    assert points["τ at p100"]["tau"].iloc[0] == 0.66
    assert points["τ + 0.5 (1 − τ)"]["tau"].iloc[0] == pytest.approx(0.8)  # 0.6 + 0.5 · 0.4: memscan's headroom
    at = {0: evaluate.summarize(points["τ + 0.25 (1 − τ)"]), 1: evaluate.summarize(points["τ + 0.5 (1 − τ)"])}
    table = evaluate.rates_table(at, ["a"]).splitlines()
    # τ 0.7 keeps one copy of two (0.7 is not above it) and no unseen image; τ 0.8 the same
    assert table[2] == "| exact | 0.50 / 0.00 |" and table[-1] == "| families with recall ≥ 0.95 and FPR ≤ 0.05 | 0 |"
    at = {0: evaluate.summarize(scores)}  # at τ 0.6: both copies, and the unseen 0.65
    assert evaluate.rates_table(at, ["a"]).splitlines()[2] == "| exact | 1.00 / 0.50 |"


def test_a_recipes_headroom_is_matchs():
    train, val, queries = _blobs(8, 1), _blobs(8, 2), np.concatenate([_blobs(8, 1)[:3], _blobs(5, 3)])
    plain = evaluate.match_recipe(presets.PIXEL, train, val, queries, n_bootstrap=0, device="cpu")
    strict = evaluate.match_recipe({**presets.PIXEL, "headroom": 0.5}, train, val, queries, n_bootstrap=0,
                                   device="cpu")
    assert strict.summary["headroom"] == 0.5 and strict.summary["percentile_threshold"] == plain.threshold
    assert strict.threshold == pytest.approx(plain.threshold + 0.5 * (1 - plain.threshold))
    assert strict.synthetic_table["copy"].to_numpy()[:3].all()  # exact copies clear any headroom


def test_score_case_raises_a_recipes_tau_by_its_headroom():
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(4, i) for i in range(3)}}
    recipes = {"plain": presets.PIXEL, "strict": {**presets.PIXEL, "headroom": 0.5}}
    scores = evaluate.score_case(case, recipes, 1, ["exact"], log=lambda *_: None)
    plain, strict = (scores[scores["detector"] == d].reset_index(drop=True) for d in recipes)
    assert np.array_equal(plain["score"], strict["score"])  # the same scores, judged against another threshold
    assert np.allclose(strict["tau_percentile"], plain["tau"]) and np.allclose(plain["tau_percentile"], plain["tau"])
    assert np.allclose(strict["tau"], plain["tau"] + 0.5 * (1 - plain["tau"]))
    assert np.allclose(strict["tau_p99"], plain["tau_p99"] + 0.5 * (1 - plain["tau_p99"]))
    # the operating points replace the recipe's headroom rather than stacking on it
    for label, at in evaluate.operating_points(scores).items():
        if label.startswith("τ +"):
            assert np.allclose(at.loc[at["detector"] == "strict", "tau"].to_numpy(),
                               at.loc[at["detector"] == "plain", "tau"].to_numpy())


def test_calibrate_lowres_takes_the_null_over_blurred_validation_images_too():
    """A plain part with ``calibrate_lowres`` keeps its scores; its null is each training image's best over the
    validation images as they are and at each lower resolution, so τ can only rise."""
    # one shared outline under each image's own fine noise: blurring a validation image removes its noise, which
    # correlated with nothing, and raises its correlation with every training image
    rng = np.random.default_rng(0)
    shared = _blobs(1, 50)
    case = {"spatial_dims": 2, "groups": {f"s{i}": (shared + 0.5 * rng.random((6, 1, 16, 16))).astype(np.float32)
                                          for i in range(3)}}
    recipes = {"plain": presets.PIXEL, "lowres": {**presets.PIXEL, "calibrate_lowres": [0.5, 0.25]}}
    scores = evaluate.score_case(case, recipes, 1, ["exact", "detail_loss"], log=lambda *_: None)
    plain, low = (scores[scores["detector"] == d].reset_index(drop=True) for d in recipes)
    assert np.array_equal(plain["score"], low["score"])
    assert (low["tau"] >= plain["tau"] - 1e-12).all() and (low["tau"] > plain["tau"] + 1e-6).any()
    blurred = evaluate.lowres(case["groups"]["s0"], 0.25)
    assert blurred.shape == case["groups"]["s0"].shape and not np.allclose(blurred, case["groups"]["s0"])


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
    """presets.DEFAULT follows the package: the training preset's views and temperature, the audit's default score
    and that score's default headroom."""
    import inspect

    from memscan.audit import (ALIGN_DEFORM, ALIGN_SHORTLIST, BENT_FEATURE_SHARE, DEFAULT_SCORE, FUSED_WEIGHTS,
                               NULL_LOW_RESOLUTION, RANK_PIXELS, _score_align_axes, alignment_size, audit,
                               best_of_pixel_size, best_of_pixel_sizes, default_headroom)
    from memscan.training import PRESETS

    score = inspect.signature(audit).parameters["score"].default
    assert presets.DEFAULT_SCORE == score == DEFAULT_SCORE
    plain = {k: v for k, v in presets.DEFAULT.items() if k != "headroom"}
    assert plain == presets.MEMSCAN_SCORES[score]
    assert presets.DEFAULT.get("headroom", 0.0) == default_headroom(score)
    for dims in (2, 3):
        adapted = presets.recipe_for(presets.DEFAULT, dims)
        enc = next(part for part in adapted.get("max_of", [adapted]) if part.get("encoder"))["encoder"]
        assert enc["augment"] == "memscan:" + PRESETS["default"][dims]["augment"]
        assert enc["temperature"] == PRESETS["default"][dims]["temperature"]
        assert enc["embedding_dim"] == min(128, PRESETS["default"][dims]["embedding_dim"])
    fused = presets.MEMSCAN_SCORES["fused"]
    assert fused["tta_flip"] and fused["pixel"] == [[4, FUSED_WEIGHTS["pixel"]]]
    assert fused["embedding_weight"] == FUSED_WEIGHTS["embedding"]
    assert not presets.MEMSCAN_SCORES["embedding"]["pixel"] and not presets.MEMSCAN_SCORES["embedding"]["tta_flip"]
    # best-of: full-size pixels (the audit keeps the benchmark's image sizes whole) and the fused score
    best = presets.MEMSCAN_SCORES["best-of"]
    assert best["normalize"] == "ceiling" and best["max_of"] == [presets.PIXEL, fused]
    assert best_of_pixel_size([64, 64]) == [64, 64] and best_of_pixel_size([12, 32, 32]) == [12, 32, 32]
    # best-of-aligned aligns at the same full size (factor 1) that its benchmark recipe does, and its pixel Pearson
    # sets are the audit's best_of_pixel_sizes: the benchmark's images whole and at a quarter per axis
    boa = presets.MEMSCAN_SCORES["best-of-aligned"]["max_of"]
    assert boa[2]["align"]["factor"] == 1 and {k: v for k, v in boa[2].items() if k != "align"} == fused
    assert [part["pixel"] for part in boa[:2]] == [[[1, 1.0]], [[4, 1.0]]]
    # ...whose null takes the validation images at the audit's lower resolutions too; the other parts' does not
    assert [part.get("calibrate_lowres") for part in boa] == [list(NULL_LOW_RESOLUTION)] * 2 + [None] * 3 + \
        [list(NULL_LOW_RESOLUTION)]
    # ...and whose full-size set scores each image by its best blend of two training images (match(blend=[0]))
    assert [part.get("blend") for part in boa] == [True] + [None] * 5
    # its last part: the full-size pixels' ranks (RANK_PIXELS), on the same null views
    assert RANK_PIXELS and boa[5] == {**presets.PIXEL, "calibrate_lowres": list(NULL_LOW_RESOLUTION), "ranks": True}
    assert best_of_pixel_sizes([64, 64], "best-of-aligned") == [[64, 64], [16, 16]]
    assert best_of_pixel_sizes([12, 32, 32], "best-of-aligned") == [[12, 32, 32], [3, 8, 8]]
    assert best_of_pixel_sizes([512, 512], "best-of-aligned") == [[64, 64], [16, 16]]
    assert best_of_pixel_sizes([64, 64], "best-of") == [[64, 64]] and not best_of_pixel_sizes([64, 64], "fused")
    # its fourth part bends the same candidates onto the query with the audit's own settings of each dimensionality;
    # its fifth mixes those pairs' fused-feature correlation in where the audit does (BENT_FEATURE_SHARE: 2D), and is
    # the fused features' own correlation where it does not (3D), or where a dimensionality has no non-rigid fit
    assert boa[3] == {**fused, "deform": "memscan"} and boa[4] == {**boa[3], "feature_share": "memscan"}
    assert BENT_FEATURE_SHARE[2] and BENT_FEATURE_SHARE[3] is None
    for dims in (2, 3):
        parts = presets.recipe_for(presets.DEFAULT, dims)["max_of"]
        share = BENT_FEATURE_SHARE[dims]
        assert parts[3]["deform"] == ALIGN_DEFORM[dims] and len(parts) == 6 and parts[5] == boa[5]
        assert parts[4] == (presets.recipe_for(fused, dims) if share is None else
                            {**presets.recipe_for(fused, dims), "deform": ALIGN_DEFORM[dims], "feature_share": share})
        assert _score_align_axes("best-of-aligned", {}, dims)["deform"] == \
            {**ALIGN_DEFORM[dims], **({} if share is None else {"feature_share": share})}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ALIGN_DEFORM, 2, None)
        assert presets.recipe_for(presets.DEFAULT, 2)["max_of"][2:] == [presets.recipe_for(boa[2], 2),
                                                                        presets.recipe_for(fused, 2), boa[5]]
        assert "deform" not in _score_align_axes("best-of-aligned", {}, 2)
    # round 20's default: the fused features' own correlation as the third part; the earlier rounds' candidates
    # come from it: round 17's is it without the blend; round 16's also without the low-resolution null; round
    # 13's without the fifth part; round 12's without the coarse-to-fine rounds of its alignment
    old = presets.CANDIDATES["best_of_aligned_fused"]["max_of"]
    unlisted = {**boa[2], "align": {k: v for k, v in boa[2]["align"].items() if k != "shortlist"}}
    assert old == boa[:2] + [fused, unlisted, boa[3]]
    assert presets.CANDIDATES["best_of_aligned_fused"]["headroom"] == 0.5
    single = [{k: v for k, v in part.items() if k != "blend"} for part in old]
    assert presets.CANDIDATES["best_of_aligned_single"] == {**presets.DEFAULT, "max_of": single}
    sharp = [{k: v for k, v in part.items() if k != "calibrate_lowres"} for part in single]
    assert presets.CANDIDATES["best_of_aligned_sharp_null"] == {**presets.DEFAULT, "max_of": sharp}
    assert presets.CANDIDATES["best_of_aligned_refined"]["max_of"] == sharp[:4]
    assert presets.CANDIDATES["best_of_aligned_rigid"] == {**presets.DEFAULT, "max_of": sharp[:4]}
    # round 21's lever: round 20's without its fused part, then the bent pairs' mix in its place, at the product's
    # share the default in 2D
    assert presets.CANDIDATES["best_of_aligned_no_fused"]["max_of"] == old[:2] + old[3:]
    mixed = presets.CANDIDATES[f"best_of_aligned_bent_features_{BENT_FEATURE_SHARE[2]:g}"]
    assert presets.recipe_for(mixed, 2) == presets.recipe_for(presets.CANDIDATES["best_of_aligned_no_shortlist"], 2)
    # round 25: the full-size pixels' ranks are the last part; round 24's default is today's without them
    assert presets.CANDIDATES["best_of_aligned_no_ranks"]["max_of"] == boa[:5]
    # round 24: the alignment's retrieval goes as deep as the audit's shortlist of each dimensionality (none in 3D);
    # round 23's default is round 24's without it
    for dims in (2, 3):
        align = presets.recipe_for(presets.DEFAULT, dims)["max_of"][2]["align"]
        assert align.get("shortlist") == ALIGN_SHORTLIST[dims]
        assert _score_align_axes("best-of-aligned", {}, dims).get("shortlist") == ALIGN_SHORTLIST[dims]
        before = presets.recipe_for(presets.CANDIDATES["best_of_aligned_no_shortlist"], dims)
        assert before == presets.recipe_for({**presets.DEFAULT, "max_of": [
            {**p, "align": {k: v for k, v in p["align"].items() if k != "shortlist"}} if p.get("align") else p
            for p in presets.DEFAULT["max_of"] if not p.get("ranks")]}, dims)
        assert "shortlist" not in before["max_of"][2]["align"]
    assert boa[2]["align"]["shortlist"] == "memscan" and ALIGN_SHORTLIST[2] and ALIGN_SHORTLIST[3] is None
    grid = copy.deepcopy(presets.CANDIDATES["best_of_aligned_refined"])
    assert grid["max_of"][3]["align"].pop("refine_rounds") > 0
    assert presets.CANDIDATES["best_of_four_hp_f1_px4"] == grid
    assert alignment_size([64, 64], "best-of-aligned") == [64, 64]
    assert alignment_size([12, 32, 32], "best-of-aligned") == [12, 32, 32]


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

    def shrink(r):
        if r.get("max_of"):
            return {**r, "max_of": [shrink(part) for part in r["max_of"]]}
        return {**r, "encoder": {**r["encoder"], **tiny}} if r.get("encoder") else r

    recipes = {name: shrink(r) for name, r in presets.MEMSCAN_SCORES.items()}
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(6, 20 + i) for i in range(3)}}
    scores = evaluate.score_case(case, recipes, 1, ["exact"], log=lambda *_: None)
    assert len(calls) == 1 and set(scores["detector"]) == {"embedding", "fused", "best-of", "best-of-aligned"}
    by = scores.groupby("detector")["score"].apply(np.asarray)
    assert not np.allclose(by["embedding"], by["fused"])  # same encoder, different scores


def test_stored_encoders_are_reused_only_by_the_code_that_trained_them(monkeypatch, tmp_path):
    from benchmarks.detection import detectors

    calls = []
    real = detectors.train_contrastive
    monkeypatch.setattr(detectors, "train_contrastive", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MEMSCAN_DETECTION_ENCODERS", str(tmp_path))
    cfg = {**presets.PAPER["encoder"], "widths": [4, 8, 8, 8], "embedding_dim": 8, "steps": 1, "batch_size": 8}
    images = _blobs(6, 3)
    key = ("settings", False, 0, "images")
    first = detectors._stored_or_trained(key, images, cfg, 0)
    again = detectors._stored_or_trained(key, images, cfg, 0)  # stored: loaded, not trained
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                                       again.state_dict().values()))
    monkeypatch.setattr(detectors, "_training_code", lambda: "another version")
    detectors._stored_or_trained(key, images, cfg, 0)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2


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


def test_max_of_recipe_is_memscans_best_of_score():
    """A ``max_of`` recipe scores every query and calibrates τ exactly as ``memscan.metrics.match(best_of=...)``
    (``memscan audit --score best-of``); centring (a benchmark lever) keeps exact copies at 1."""
    from memscan.metrics import best_of_correlation, match
    from memscan.scoring import pixel_features, standardize_rows

    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(10, 20 + i) for i in range(3)}}
    coarse = {**presets.PIXEL, "pixel": [[4, 1.0]]}
    recipes = {"best": {"max_of": [presets.PIXEL, coarse], "normalize": "ceiling"},
               "centered": {**presets.PIXEL, "center": 1.0}}
    families = ["exact", "noise_blur"]
    scores = evaluate.score_case(case, recipes, 1, families, log=lambda *_: None)
    tr, va, _ = evaluate.permutations(sorted(case["groups"]), 1)[0]
    k, (fam, strength) = next((k, s) for k, s in enumerate(perturb.settings(families)) if s[0] == "noise_blur")
    query = perturb.perturb(case["groups"][tr], fam, strength, seed=7 * k)

    def feats(x):  # as memscan.audit computes the best-of blocks: standardised rows
        return [standardize_rows(pixel_features(x)), standardize_rows(pixel_features(x, [4, 4]))]

    t, v, q = feats(case["groups"][tr]), feats(case["groups"][va]), feats(query)
    ref = match(t[0], v[0], q[0], device="cpu", n_bootstrap=0, best_of=[(t[1], v[1], q[1])])
    values, _ = best_of_correlation(q, t, ref.summary["feature_set_thresholds"], device="cpu")
    got = scores[(scores.detector == "best") & (scores.family == fam) & (scores.strength == strength)
                 & (scores.label == 1)]
    np.testing.assert_allclose(got["score"], values, atol=1e-6)
    assert got["tau"].iloc[0] == pytest.approx(ref.threshold, abs=1e-6)
    exact = scores[(scores.detector == "centered") & (scores.family == "exact") & (scores.label == 1)]
    np.testing.assert_allclose(exact["score"], 1.0, atol=1e-5)


@pytest.mark.parametrize("bend", [None, "all", "first", "confirmed", "shortlist"])
def test_best_of_aligned_recipe_is_memscans_refine_plus_best_of(bend):
    """``presets.MEMSCAN_SCORES["best-of-aligned"]``'s structure (pixels, retrieval features, their candidates
    re-scored by aligned pixels alone, and the same candidates bent onto their query: all of them, or as in 3D only
    the alignment's first; and those bent pairs' feature correlation mixed with their bent score; or a deeper
    retrieval narrowed by a quick alignment, as in 2D) scores and calibrates τ as ``memscan.metrics.match(refine=...,
    best_of=...)`` does (``memscan audit --score best-of-aligned``), here with coarse pixels as the retrieval
    features."""
    from memscan.audit import (ALIGN_HIGHPASS, ALIGN_HIGHPASS_WEIGHT, ALIGN_REFINE_ROUNDS, NULL_LOW_RESOLUTION,
                               _aligned_refine, _score_align_axes, alignment_size)
    from memscan.data.transforms import low_resolution
    from memscan.metrics import match
    from memscan.scoring import (align_and_correlate, deform_and_correlate, pixel_features, rank_rows,
                                 standardize_rows)

    product = presets.MEMSCAN_SCORES["best-of-aligned"]
    assert product["max_of"][0] == {**presets.PIXEL, "calibrate_lowres": list(NULL_LOW_RESOLUTION), "blend": True}
    align = product["max_of"][2]["align"]
    assert align["weights"] == {"pixel": 1.0, "features": 0.0} and align["scoring"] == "retrieval"

    axes = _score_align_axes("best-of-aligned", {"flip_axes": ()}, 2)  # the audit's own alignment arguments
    axes.pop("deform")  # the rigid alignment alone here (its non-rigid fit: test_deform_part_is_the_audits_refine)
    axes.pop("shortlist")  # and on the retrieval's candidates only, but where ``bend`` is "shortlist"
    assert align["highpass"] == [axes["highpass"], axes["highpass_weight"]] == [ALIGN_HIGHPASS, ALIGN_HIGHPASS_WEIGHT]
    assert align["refine_rounds"] == axes["refine_rounds"] == ALIGN_REFINE_ROUNDS > 0
    coarse = {**presets.PIXEL, "pixel": [[4, 1.0]]}
    # every validation image a candidate: match() calibrates on the top k of each half of the validation set (its
    # null split), the benchmark on the top k of the whole, so only an exhaustive k searches the same pairs in both;
    # and one validation subject (no null split), so the bent first candidate is the whole set's in both
    k_all = 10
    zooms = product["max_of"][0]["calibrate_lowres"]  # the pixel parts' null views, as the audit's
    plain_align = {k: v for k, v in align.items() if k != "shortlist"}
    shortlist = {"depth": k_all, "extra": 2, "factor": 2, "highpass": 0.5}  # 3 of the retrieval's, 2 of the rest
    recipe = {"max_of": [{**presets.PIXEL, "calibrate_lowres": zooms, "blend": True}, coarse,
                         {**coarse, "align": {**plain_align, "k": k_all} if bend != "shortlist" else
                          {**plain_align, "k": 3, "shortlist": shortlist}}], "normalize": "ceiling"}
    assert product["max_of"][-1] == {**presets.PIXEL, "calibrate_lowres": zooms, "ranks": True}
    ranked = copy.deepcopy(product["max_of"][-1])  # the full-size pixels' ranks (RANK_PIXELS): last, as the product
    bent = {"spacing": 8.0, "iterations": 3, "fit_highpass": [4.0, 2.0]}  # few steps: the same pairs, not a fit
    if bend and bend != "shortlist":
        recipe["max_of"].append({**coarse, "deform": {**bent, "k": 1 if bend == "first" else k_all}})
    if bend == "confirmed":
        recipe["max_of"].append({**recipe["max_of"][-1], "feature_share": 0.4})
    recipe["max_of"].append(ranked)
    # grainy images: a low-resolution version loses the grain and correlates better, so the pixel null views count
    grain = np.random.default_rng(3)
    case = {"spatial_dims": 2, "groups": {f"s{i}": (_blobs(k_all, 40 + i) + grain.random((k_all, 1, 16, 16))
                                                     ).astype(np.float32) for i in range(3)}}
    families = ["exact", "shift_rotate"]
    scores = evaluate.score_case(case, {"boa": recipe}, 1, families, log=lambda *_: None)
    tr, va, _ = evaluate.permutations(sorted(case["groups"]), 1)[0]
    k, (fam, strength) = next((k, s) for k, s in enumerate(perturb.settings(families)) if s[0] == "shift_rotate")
    query = perturb.perturb(case["groups"][tr], fam, strength, seed=7 * k)
    images = {"train": case["groups"][tr], "val": case["groups"][va], "synthetic": query}
    size = [n // align["factor"] for n in query.shape[2:]]
    assert size == alignment_size(query.shape[2:], "best-of-aligned")  # the audit's grid for this score

    def refine(q, rows, ref, candidates, values):
        if bend == "shortlist":  # the audit's own refine, told to keep the recipe's 3
            return _aligned_refine(images, {**axes, "size": size, "device": "cpu",
                                            "shortlist": {**shortlist, "keep": 3}})(q, rows, ref, candidates, values)
        found = align_and_correlate(images[q][rows], images[ref], candidates, feature_scores=values,
                                    size=size, **axes)
        if not bend:
            return found.score, found.index
        first = found.ranked()[:, :1 if bend == "first" else len(candidates[0])]  # by the aligned score, as the audit
        other = deform_and_correlate(images[q][rows], images[ref], first, device="cpu", **bent)
        scores, indices = [found.score, other.score], [found.index, other.index]
        if bend == "confirmed":  # each bent pair: 0.4 × its feature correlation + 0.6 × its bent score
            mixed = np.array([[0.4 * values[r][list(candidates[r]).index(c)] + 0.6 * p for c, p in zip(cs, ps)]
                              for r, (cs, ps) in enumerate(zip(other.candidates, other.pixel))])
            scores.append(mixed.max(axis=1))
            indices.append(other.candidates[np.arange(len(rows)), mixed.argmax(axis=1)])
        return np.stack(scores, axis=1), np.stack(indices, axis=1)

    pix = {k: standardize_rows(pixel_features(x)) for k, x in images.items()}
    crs = {k: standardize_rows(pixel_features(x, [4, 4])) for k, x in images.items()}
    low = [standardize_rows(pixel_features(np.stack([low_resolution(x, z) for x in images["val"]]))) for z in zooms]
    rks = {k: standardize_rows(rank_rows(pixel_features(x))) for k, x in images.items()}
    low_rks = [standardize_rows(rank_rows(view)) for view in low]
    one_subject = np.zeros(len(images["val"]), dtype=int)
    sets = [tuple(pix[k] for k in images), tuple(crs[k] for k in images), tuple(rks[k] for k in images)]
    ref = match(crs["train"], crs["val"], crs["synthetic"], device="cpu", n_bootstrap=0, refine=refine,
                refine_k=k_all, best_of=sets, null_views=[low, [], low_rks], blend=[0], val_subjects=one_subject)
    sharp = match(crs["train"], crs["val"], crs["synthetic"], device="cpu", n_bootstrap=0, refine=refine,
                  refine_k=k_all, best_of=sets, blend=[0], val_subjects=one_subject)
    assert ref.summary["feature_set_thresholds"][-3] > sharp.summary["feature_set_thresholds"][-3]  # views count
    if bend == "confirmed":  # a third refine column, on its own τ_b
        assert len(ref.summary["feature_set_thresholds"]) == 6
        assert ref.summary["feature_set_thresholds"][2] != ref.summary["feature_set_thresholds"][1]
    got = scores[(scores.family == fam) & (scores.strength == strength) & (scores.label == 1)]
    assert got["tau"].iloc[0] == pytest.approx(ref.threshold, abs=1e-6)
    np.testing.assert_allclose(got["score"], ref.best_train_for_synthetic, atol=1e-6)
    plain = match(crs["train"], crs["val"], crs["synthetic"], device="cpu", n_bootstrap=0,
                  best_of=[tuple(pix[k] for k in images)])
    assert not np.allclose(plain.best_train_for_synthetic, ref.best_train_for_synthetic)  # the aligned set counts
    # evaluate.match_recipe (the DDPM audit's path) builds the same match from the recipe itself
    via_recipe = evaluate.match_recipe(recipe, images["train"], images["val"], query, device="cpu", n_bootstrap=0,
                                       val_subjects=one_subject)
    assert via_recipe.threshold == pytest.approx(ref.threshold, abs=1e-9)
    np.testing.assert_allclose(via_recipe.best_train_for_synthetic, ref.best_train_for_synthetic, atol=1e-9)
    np.testing.assert_array_equal(via_recipe.synthetic_table["best_train_index"], ref.synthetic_table["best_train_index"])
    single = evaluate.match_recipe(presets.PIXEL, images["train"], images["val"], query, device="cpu", n_bootstrap=0)
    np.testing.assert_allclose(single.best_train_for_synthetic,
                               match(pix["train"], pix["val"], pix["synthetic"], device="cpu",
                                     n_bootstrap=0).best_train_for_synthetic, atol=1e-9)


def test_deformed_scores_mix_the_bent_pairs_feature_correlation_by_feature_share():
    """A deform part's ``feature_share`` scores each bent pair ``share`` × its feature correlation + the rest × its
    bent score, the best per query (the audit's third refine column), from the same fit as its plain twin."""
    from memscan.scoring import deform_and_correlate, standardize_rows

    query, reference = _blobs(3, 5, (16, 16)), _blobs(4, 6, (16, 16))
    query[0] = reference[2]
    feats = {"q": np.random.default_rng(0).random((3, 6)), "r": np.random.default_rng(1).random((4, 6))}
    ranked = np.array([[2, 0, 1, 3], [1, 3, 0, 2], [3, 2, 1, 0]])
    part = {"deform": {"spacing": 8.0, "iterations": 3, "k": 2}}
    plain = evaluate.deformed_scores(part, query, reference, feats["q"], feats["r"], ranked)
    mixed = evaluate.deformed_scores({**part, "feature_share": 0.3}, query, reference, feats["q"], feats["r"], ranked)
    bent = deform_and_correlate(query, reference, ranked[:, :2], device="cpu", spacing=8.0, iterations=3)
    corr = standardize_rows(feats["q"]) @ standardize_rows(feats["r"]).T
    expect = (0.3 * np.take_along_axis(corr, ranked[:, :2], axis=1) + 0.7 * bent.pixel).max(axis=1)
    np.testing.assert_allclose(plain, bent.score, atol=1e-9)
    np.testing.assert_allclose(mixed, expect, atol=1e-6)
    assert not np.allclose(mixed, plain)


def test_max_of_recipe_with_an_aligned_detector():
    """A ``max_of`` part with ``align`` is scored and calibrated by its aligned search; exact copies stay at the top."""
    case = {"spatial_dims": 2, "groups": {f"s{i}": _blobs(8, 30 + i, (24, 24)) for i in range(3)}}
    aligned_pixel = {**presets.PIXEL, "align": {**presets.ALIGN, "factor": 1}}
    recipes = {"plain": {"max_of": [presets.PIXEL], "normalize": "ceiling"},
               "with_aligned": {"max_of": [presets.PIXEL, aligned_pixel], "normalize": "ceiling"}}
    scores = evaluate.score_case(case, recipes, 1, ["exact", "shift_rotate"], log=lambda *_: None)
    assert np.isfinite(scores["score"]).all() and np.isfinite(scores["tau"]).all()
    summary = evaluate.summarize(scores).set_index(["detector", "family"])
    assert summary.loc[("with_aligned", "exact"), "recall"] == 1.0
    by = scores.groupby("detector")["score"].apply(np.asarray)
    assert not np.allclose(by["plain"], by["with_aligned"])  # the aligned part took part


def test_compare_runs_puts_one_detector_of_two_runs_side_by_side(tmp_path):
    from benchmarks.detection import compare_runs

    def run(shift: float) -> dict:
        rows = pd.DataFrame({"perm": 0, "detector": "memscan_default", "family": "exact", "label": [1, 1, 0, 0],
                             "score": np.array([0.9, 0.7, 0.65, 0.3]) + shift, "tau": 0.6})
        return {"case_a": pd.concat([rows, rows.assign(detector="pixel")], ignore_index=True)}

    table = compare_runs.compare(run(0.0), run(-0.1), "memscan_default", ("grid", "refined")).splitlines()
    assert table[0] == "#### case_a"
    assert table[2] == "| family | grid AUROC / recall / FPR | refined AUROC / recall / FPR |"
    # the second run's scores are 0.1 lower: one copy (0.6) and the unseen 0.55 no longer clear τ 0.6
    assert table[4] == "| exact | 1.000 / 1.00 / 0.50 | 1.000 / 0.50 / 0.00 |"
    with pytest.raises(ValueError, match="nobody"):
        compare_runs.compare(run(0.0), run(-0.1), "nobody")
    for i, scores in enumerate((run(0.0), run(-0.1))):
        pd.to_pickle({"scores": scores}, tmp_path / f"{i}.pkl")
    assert compare_runs.main([str(tmp_path / "0.pkl"), str(tmp_path / "1.pkl"), "--detector", "pixel"]) == 0
    assert compare_runs.main([str(tmp_path / "0.pkl"), str(tmp_path / "missing.pkl")]) == 2


@pytest.mark.parametrize("shape,deform3d", [((16, 16), None), ((6, 12, 12), None),
                                            ((6, 12, 12), {"spacing": 4.0, "iterations": 2, "k": 1})])
def test_match_recipe_takes_memscans_deform_part_of_the_images_dimensionality(shape, deform3d, monkeypatch):
    """The DDPM audit's path (``evaluate.match_recipe``) resolves a ``"deform": "memscan"`` part as the benchmark's
    scores do (``presets.recipe_for``): the audit's settings of the images' dimensionality as the refine's second
    score set, or none where those are None."""
    import memscan.audit as audit_mod

    coarse = {**presets.PIXEL, "pixel": [[2, 1.0]]}
    align = {"factor": 1, "k": 2, "scoring": "retrieval", "weights": {"pixel": 1.0, "features": 0.0}}
    recipe = {"max_of": [presets.PIXEL, {**coarse, "align": align}, {**coarse, "deform": "memscan"}],
              "normalize": "ceiling"}
    monkeypatch.setitem(audit_mod.ALIGN_DEFORM, 2, {"spacing": 8.0, "iterations": 2, "k": 2})
    monkeypatch.setitem(audit_mod.ALIGN_DEFORM, 3, deform3d)
    train, val, queries = _blobs(4, 1, shape), _blobs(4, 2, shape), _blobs(3, 3, shape)
    res = evaluate.match_recipe(recipe, train, val, queries, device="cpu", n_bootstrap=0)
    # feature sets: the aligned refine, the bent one where the dimensionality has settings, then the plain pixels
    assert len(res.summary["feature_set_thresholds"]) == (2 if len(shape) == 3 and deform3d is None else 3)


def test_match_recipe_refuses_a_feature_share_part_without_its_deform_twin():
    """A ``feature_share`` part re-scores the pairs its deform twin bent: without that twin, or with other deform
    settings, ``match_recipe`` says so in one line instead of scoring something the audit never runs."""
    coarse = {**presets.PIXEL, "pixel": [[2, 1.0]]}
    align = {"factor": 1, "k": 2, "scoring": "retrieval", "weights": {"pixel": 1.0, "features": 0.0}}
    bent = {**coarse, "deform": {"spacing": 8.0, "iterations": 2, "k": 2}}
    mixed = {**bent, "feature_share": 0.5}
    train, val, queries = _blobs(4, 1, (16, 16)), _blobs(4, 2, (16, 16)), _blobs(3, 3, (16, 16))
    for parts in ([{**coarse, "align": align}, mixed],
                  [{**coarse, "align": align}, bent, {**mixed, "deform": {**bent["deform"], "spacing": 6.0}}]):
        with pytest.raises(ValueError, match="a feature_share part re-scores the deform part's pairs"):
            evaluate.match_recipe({"max_of": parts, "normalize": "ceiling"}, train, val, queries, device="cpu",
                                  n_bootstrap=0)
