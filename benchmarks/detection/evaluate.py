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

from memscan.metrics import calibrate_threshold, topk_correlation

try:  # run as a script (python benchmarks/detection/run.py) or imported as a package module
    from .detectors import fit_detector
    from .perturb import perturb, settings
    from .presets import recipe_for
except ImportError:  # pragma: no cover
    from detectors import fit_detector
    from perturb import perturb, settings
    from presets import recipe_for

__all__ = ["permutations", "score_case", "summarize"]


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
            if (name, tr) not in fitted:
                t0 = time.time()
                fitted[(name, tr)] = fit_detector(recipe, groups[tr], seed=seed, encoders=encoders)
                log(f"  fitted {name} on {tr} in {time.time() - t0:.1f}s")
            feats = fitted[(name, tr)]
            f_train, f_val = feats(groups[tr]), feats(groups[va])
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
