"""Score every detector on every perturbation family, rotated over subject permutations.

For one permutation (training, validation, unseen subject) and one detector:
τ = 95th percentile of each training image's best validation correlation (Dar et al.; ``calibrate_threshold``);
positives = training images through a family, negatives = unseen-subject images through the same family;
score = best correlation with the training set (``topk_correlation``). AUROC from the scores
(``sklearn.metrics.roc_auc_score``), recall = share of positives above τ, FPR = share of negatives above τ.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from memscan.metrics import calibrate_threshold, scale_to_null, topk_correlation
from memscan.scoring import align_and_correlate, aligned_search

try:  # run as a script (python benchmarks/detection/run.py) or imported as a package module
    from .detectors import fit_detector
    from .perturb import perturb, settings
    from .presets import recipe_for
except ImportError:  # pragma: no cover
    from detectors import fit_detector
    from perturb import perturb, settings
    from presets import recipe_for

__all__ = ["permutations", "score_case", "summarize", "scoring_recipe", "aligned_scores"]


def permutations(subjects: list[str], n: int) -> list[tuple[str, str, str]]:
    """The first ``n`` (train, val, unseen) orders; cyclic ones first so 3 permutations use each subject once."""
    cyc = [tuple(subjects[(i + k) % 3] for k in range(3)) for i in range(3)]
    rest = [p for p in itertools.permutations(subjects) if p not in cyc]
    return (cyc + rest)[:n]


def score_case(case: dict, recipes: dict[str, dict], n_perm: int, families: list[str] | None = None,
               seed: int = 0, log=print) -> pd.DataFrame:
    """Scores of every synthetic image for every (permutation, detector, family, strength).

    An encoder depends only on its training subject, so it is trained once per subject and reused by the
    permutations that share it.

    Returns:
        Long table with columns perm, train, val, unseen, detector, family, strength, label, score, tau.
    """
    groups, dims = case["groups"], case["spatial_dims"]
    perms = permutations(sorted(groups), n_perm)
    sets = settings(families)
    # perturbed images are shared by all detectors: positives from the training subject, negatives from unseen
    needed = {p[0] for p in perms} | {p[2] for p in perms}
    synth = {(s, f, st): perturb(groups[s], f, st, seed=seed + 7 * k)
             for s in needed for k, (f, st) in enumerate(sets)}
    rows = []
    fitted: dict = {}
    encoders: dict = {}  # recipes that differ only in scoring train their encoder once
    for name, recipe in recipes.items():
        recipe = recipe_for(recipe, dims)
        for pi, (tr, va, un) in enumerate(perms):
            if (name, tr) not in fitted and not recipe.get("max_of"):
                t0 = time.time()
                fitted[(name, tr)] = fit_detector(recipe, groups[tr], seed=seed, encoders=encoders)
                log(f"  fitted {name} on {tr} in {time.time() - t0:.1f}s")
            if recipe.get("max_of"):
                rows += _max_of_rows(recipe, name, pi, (tr, va, un), groups, synth, sets, fitted, seed, encoders)
                continue
            feats = fitted[(name, tr)]
            if recipe.get("center"):  # features minus a share of the training set's mean feature vector
                feats = _centered(feats, groups[tr], float(recipe["center"]))
            f_train, f_val = feats(groups[tr]), feats(groups[va])
            if recipe.get("align"):
                if (name, tr, "scoring") not in fitted:
                    fitted[(name, tr, "scoring")] = fit_detector(scoring_recipe(recipe), groups[tr], seed=seed,
                                                                 encoders=encoders)
                s_feats = fitted[(name, tr, "scoring")]
                s_train = s_feats(groups[tr])
                t0 = time.time()
                # the null of the same search: each training image against its validation candidates
                tau = float(np.percentile(aligned_scores(recipe, groups[tr], groups[va], f_train, f_val, s_train,
                                                         s_feats(groups[va])), 95.0))
                for f, st in sets:
                    for label, subj in ((1, tr), (0, un)):
                        imgs = synth[(subj, f, st)]
                        vals = aligned_scores(recipe, imgs, groups[tr], feats(imgs), f_train, s_feats(imgs), s_train)
                        rows.append(pd.DataFrame({
                            "perm": pi, "train": tr, "val": va, "unseen": un, "detector": name, "family": f,
                            "strength": st, "label": label, "score": vals, "tau": tau}))
                log(f"  aligned {name} perm {pi} in {time.time() - t0:.1f}s")
                continue
            if recipe.get("calibration", "train_to_val") == "val_to_train":
                # the null of a novel image: each validation image's best training correlation
                tau = calibrate_threshold(f_val, f_train, 95.0, device="cpu")
            else:  # Dar et al.: each training image's best validation correlation
                tau = calibrate_threshold(f_train, f_val, 95.0, device="cpu")
            for f, st in sets:
                for label, subj in ((1, tr), (0, un)):
                    vals, _ = topk_correlation(feats(synth[(subj, f, st)]), f_train, 1, device="cpu")
                    rows.append(pd.DataFrame({
                        "perm": pi, "train": tr, "val": va, "unseen": un, "detector": name, "family": f,
                        "strength": st, "label": label, "score": vals[:, 0], "tau": tau}))
    return pd.concat(rows, ignore_index=True)


def _centered(feats, train_images: np.ndarray, share: float):
    """``feats`` minus ``share`` × the training images' mean feature vector (1 = fully centred on the training set)."""
    mean = share * feats(train_images).mean(axis=0, keepdims=True)
    return lambda images: feats(images) - mean


def null_normalized(scores: np.ndarray, null: np.ndarray, tau: float, how: str) -> np.ndarray:
    """A detector's best correlations on a common scale anchored at its own null (its τ maps to 0).

    ``how``: ``"ceiling"`` = (s − τ) / (1 − τ) (1 = an exact copy), ``"spread"`` = (s − τ) / (τ − median of the
    null) (the null's upper half spans [-1, 0]).
    """
    if how == "ceiling":  # memscan's own scale (match(best_of=...), audit --score best-of)
        return scale_to_null(scores, tau)
    if how != "spread":
        raise ValueError(f"unknown normalization {how!r}")
    return (np.asarray(scores, dtype=np.float64) - tau) / max(tau - float(np.median(null)), 1e-12)


def _max_of_rows(recipe: dict, name: str, pi: int, perm: tuple[str, str, str], groups: dict, synth: dict,
                 sets: list, fitted: dict, seed: int, encoders: dict) -> list[pd.DataFrame]:
    """Score rows of a ``max_of`` recipe: the best of its detectors' null-normalized scores; τ is the 95th
    percentile of the same combination of each training image's best validation correlations (of each validation
    image's best training correlations with ``calibration="val_to_train"``)."""
    tr, va, un = perm
    how = recipe.get("normalize", "ceiling")
    nulls, queries = [], []
    for k, sub in enumerate(recipe["max_of"]):
        if (name, k, tr) not in fitted:
            fitted[(name, k, tr)] = fit_detector(sub, groups[tr], seed=seed, encoders=encoders)
        feats = fitted[(name, k, tr)]
        if sub.get("center"):
            feats = _centered(feats, groups[tr], float(sub["center"]))
        f_train = feats(groups[tr])
        if sub.get("align"):  # its best score after test-time alignment, calibrated on the same search
            if (name, k, tr, "scoring") not in fitted:
                fitted[(name, k, tr, "scoring")] = fit_detector(scoring_recipe(sub), groups[tr], seed=seed,
                                                                encoders=encoders)
            s_feats = fitted[(name, k, tr, "scoring")]
            s_train = s_feats(groups[tr])

            def best(images, _feats=feats, _s=s_feats, _sub=sub, _ft=f_train, _st=s_train):
                return aligned_scores(_sub, images, groups[tr], _feats(images), _ft, _s(images), _st)

            null = aligned_scores(sub, groups[tr], groups[va], f_train, feats(groups[va]), s_train,
                                  s_feats(groups[va]))
        else:
            def best(images, _feats=feats, _ft=f_train):
                return topk_correlation(_feats(images), _ft, 1, device="cpu")[0][:, 0]

            if recipe.get("calibration", "train_to_val") == "val_to_train":  # the null of a novel query
                null = best(groups[va])
            else:
                null = topk_correlation(f_train, feats(groups[va]), 1, device="cpu")[0][:, 0]
        tau_k = float(np.percentile(null, 95.0))
        nulls.append(null_normalized(null, null, tau_k, how))
        queries.append({(subj, f, st): null_normalized(best(synth[(subj, f, st)]), null, tau_k, how)
                        for f, st in sets for subj in (tr, un)})
    tau = float(np.percentile(np.max(nulls, axis=0), 95.0))
    rows = []
    for f, st in sets:
        for label, subj in ((1, tr), (0, un)):
            vals = np.max([q[(subj, f, st)] for q in queries], axis=0)
            rows.append(pd.DataFrame({"perm": pi, "train": tr, "val": va, "unseen": un, "detector": name,
                                      "family": f, "strength": st, "label": label, "score": vals, "tau": tau}))
    return rows


def scoring_recipe(recipe: dict) -> dict:
    """The features fused with the aligned pixels of an ``align`` recipe: its embedding alone (flip-invariant when
    the recipe is), or its ordinary features when it has no encoder."""
    if not recipe.get("encoder"):
        return {k: v for k, v in recipe.items() if k != "align"}
    return {"pixel": [], "encoder": recipe["encoder"], "embedding_weight": 1.0, "tta_flip": recipe.get("tta_flip"),
            **({"canonical": True} if recipe.get("canonical") else {})}


def aligned_scores(recipe: dict, query: np.ndarray, reference: np.ndarray, q_feat: np.ndarray, r_feat: np.ndarray,
                   q_scoring: np.ndarray, r_scoring: np.ndarray) -> np.ndarray:
    """Each query's best score after retrieval (top-k by the recipe's features) and geometric verification
    (``memscan.scoring.aligned_search``) on coarse images (``align["factor"]``× smaller per axis)."""
    a = dict(recipe["align"])
    factor = a.pop("factor", 2)
    k = a.pop("k", 5)
    highpass = a.pop("highpass", None)  # (σ px at the coarse size, weight): see bandpass_study.py
    if a.pop("scoring", "embedding") == "retrieval":  # fuse the aligned pixels with the retrieval features' score
        q_scoring, r_scoring = q_feat, r_feat
    size = [max(2, s // factor) for s in query.shape[2:]]
    flip = (-1,) if recipe.get("tta_flip") else ()
    res = aligned_search(query, reference, q_feat, r_feat, k=k, query_scoring=q_scoring, reference_scoring=r_scoring,
                         device="cpu", size=size, flip_axes=flip, **a)
    if not highpass:
        return res.score
    # the same candidates aligned again on high-passed coarse images; pixel term = (1 - w) plain + w high-pass
    from bandpass_study import _blur, _down

    sigma, w = float(highpass[0]), float(highpass[1])
    qc, rc = _down(query, factor), _down(reference, factor)
    hp = align_and_correlate(qc - _blur(qc, sigma), rc - _blur(rc, sigma), res.candidates, flip_axes=flip,
                             **{key: v for key, v in a.items() if key != "weights"}).pixel
    wts = a.get("weights") or {"pixel": 1.0, "features": 1.0}
    wp, wf = float(wts["pixel"]), float(wts["features"])
    if wf <= 0:  # the feature term is recovered from the fused mean below
        raise ValueError("align.highpass needs a features weight > 0")
    feat = ((wp + wf) * res.fused - wp * res.pixel) / wf
    fused = (wp * ((1 - w) * res.pixel + w * hp) + wf * feat) / (wp + wf)
    fused[res.candidates < 0] = -np.inf
    return fused.max(axis=1)


def _metrics(g: pd.DataFrame) -> pd.Series:
    y, s, tau = g["label"].to_numpy(), g["score"].to_numpy(), g["tau"].iloc[0]
    auc = roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan
    return pd.Series({"auroc": auc, "recall": float((s[y == 1] > tau).mean()), "fpr": float((s[y == 0] > tau).mean()),
                      "tau": tau})


def summarize(scores: pd.DataFrame, by_strength: bool = False) -> pd.DataFrame:
    """Per detector × family (and "overall"): metrics per permutation, then mean and worst over permutations."""
    keys = ["detector", "family"] + (["strength"] if by_strength else [])
    per = scores.groupby(keys + ["perm"]).apply(_metrics, include_groups=False).reset_index()
    overall = scores.groupby(["detector", "perm"]).apply(_metrics, include_groups=False).reset_index()
    overall["family"] = "overall"
    if by_strength:
        overall["strength"] = ""
    per = pd.concat([per, overall], ignore_index=True)
    agg = per.groupby(keys).agg(auroc=("auroc", "mean"), auroc_min=("auroc", "min"), recall=("recall", "mean"),
                                recall_min=("recall", "min"), fpr=("fpr", "mean"), fpr_max=("fpr", "max"),
                                tau=("tau", "mean"), n_perm=("perm", "nunique"))
    return agg.reset_index()
