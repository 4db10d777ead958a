"""Score every detector on every perturbation family, rotated over subject permutations.

For one permutation (training, validation, unseen subject) and one detector:
τ = 95th percentile (``memscan.metrics.percentile``) of each training image's best validation correlation (Dar
et al.); a ``max_of`` recipe scores by the best of its parts, each scaled by its own null (``null_normalized``);
positives = training images through a family, negatives = unseen-subject images through the same family;
score = best correlation with the training set (``topk_correlation``). AUROC from the scores
(``sklearn.metrics.roc_auc_score``), recall = share of positives above τ, FPR = share of negatives above τ.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from memscan.metrics import blend_correlation, percentile, scale_to_null, topk_correlation, with_headroom
from memscan.scoring import (BEND_CHOICE, aligned_search, bend_candidates, deform_and_correlate, rank_rows,
                             shortlist_depth, standardize_rows)

try:  # run as a script (python benchmarks/detection/run.py) or imported as a package module
    from .detectors import fit_detector
    from .perturb import perturb, settings
    from .presets import recipe_for
except ImportError:  # pragma: no cover
    from detectors import fit_detector
    from perturb import perturb, settings
    from presets import recipe_for

__all__ = ["STRICTER_PERCENTILES", "HEADROOMS", "permutations", "score_case", "summarize", "seed_table",
           "fpr_at_recall", "headroom_label", "operating_points", "rates_table", "scoring_recipe", "aligned_scores",
           "match_recipe"]


#: τ at these percentiles of the same null too (columns ``tau_p99``, ``tau_p100``): the stricter operating points
#: ``memscan audit --percentile`` offers; ``summarize(scores.assign(tau=scores["tau_p99"]))`` reads recall / FPR there
STRICTER_PERCENTILES = (99.0, 100.0)
#: τ raised by these headrooms (``memscan audit --headroom``, :func:`memscan.metrics.with_headroom`), read beside τ
HEADROOMS = (0.25, 0.5)


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

    A recipe's ``headroom`` (``memscan audit --headroom``) raises its τ as the audit does: ``tau`` and every
    ``tau_p<q>`` are then ``with_headroom(percentile, headroom)``, and ``tau_percentile`` keeps the 95th percentile.

    Returns:
        Long table with columns perm, train, val, unseen, detector, family, strength, label, score, tau (the
        detector's decision threshold: the 95th percentile of the null, raised by its headroom), ``tau_p<q>`` for
        each of :data:`STRICTER_PERCENTILES` (raised the same way) and ``tau_percentile`` (the 95th percentile).
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
        headroom = float(recipe.get("headroom", 0.0))
        recipe = recipe_for(recipe, dims)
        parts = recipe.get("max_of") or [recipe]
        how = recipe.get("normalize", "ceiling")
        for pi, (tr, va, un) in enumerate(perms):
            t0 = time.time()
            scorers = [_scorer(part, (name, k), tr, va, groups, fitted, seed, encoders, log)
                       for k, part in enumerate(parts)]
            if len(scorers) == 1:  # the detector's own score and τ
                (null, best), = scorers
                score = best
            else:  # the best of the parts' scores, each scaled by its own null; τ on the same combination
                taus = [percentile(null, 95.0) for null, _ in scorers]
                null = np.max([null_normalized(n, n, t, how) for (n, _), t in zip(scorers, taus)], axis=0)

                def score(images, _scorers=scorers, _taus=taus):
                    return np.max([null_normalized(best(images), n, t, how)
                                   for (n, best), t in zip(_scorers, _taus)], axis=0)
            tau_percentile = percentile(null, 95.0)
            tau = with_headroom(tau_percentile, headroom)
            stricter = {f"tau_p{q:g}": with_headroom(percentile(null, q), headroom) for q in STRICTER_PERCENTILES}

            for f, st in sets:
                for label, subj in ((1, tr), (0, un)):
                    rows.append(pd.DataFrame({
                        "perm": pi, "train": tr, "val": va, "unseen": un, "detector": name, "family": f,
                        "strength": st, "label": label, "score": score(synth[(subj, f, st)]), "tau": tau,
                        **stricter, "tau_percentile": tau_percentile}))
            if any(part.get("align") for part in parts):
                log(f"  aligned {name} perm {pi} in {time.time() - t0:.1f}s")
    return pd.concat(rows, ignore_index=True)


def _centered(feats, train_images: np.ndarray, share: float):
    """``feats`` minus ``share`` × the training images' mean feature vector (1 = fully centred on the training set)."""
    mean = share * feats(train_images).mean(axis=0, keepdims=True)
    return lambda images: feats(images) - mean


def _ranked(feats):
    """``feats`` with each row replaced by its ranks within the row (:func:`memscan.scoring.rank_rows`)."""
    return lambda images: rank_rows(feats(images)).astype(np.float32)


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


def _scorer(recipe: dict, key: tuple, tr: str, va: str, groups: dict, fitted: dict, seed: int, encoders: dict,
            log) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """One detector on one permutation: its null and ``best(images)``, each image's best training score.

    The null is every training image's best validation score (Dar et al.), or every validation image's best
    training score with ``calibration="val_to_train"``; with ``calibrate_lowres`` (zooms) each training image's best
    over the validation images as they are and at each lower resolution (:func:`lowres`); with ``align`` both come
    from the aligned search. The fitted detector is cached in ``fitted`` under ``key + (tr,)``.
    """
    if key + (tr,) not in fitted:
        t0 = time.time()
        fitted[key + (tr,)] = fit_detector(recipe, groups[tr], seed=seed, encoders=encoders)
        log(f"  fitted {key[0]} on {tr} in {time.time() - t0:.1f}s")
    feats = fitted[key + (tr,)]
    if recipe.get("center"):  # features minus a share of the training set's mean feature vector
        feats = _centered(feats, groups[tr], float(recipe["center"]))
    if recipe.get("ranks"):  # each row's ranks within it: Spearman (memscan.audit.RANK_PIXELS)
        feats = _ranked(feats)
    f_train = feats(groups[tr])
    # a max_of recipe's align part ranks each query's candidates; its deform part bends the first of them, as the audit
    ranked = fitted.setdefault((key[0], "ranked"), {})
    if recipe.get("deform"):  # top-k candidates (the align part's ranking, else the part's features), bent on the query
        def order(query: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
            # the align part scores (and ranks) every image set before this part does: a missing key is a bug
            return ranked[(_digest(query), _digest(reference))] if ranked else None

        def deformed(images: np.ndarray) -> np.ndarray:
            return deformed_scores(recipe, images, groups[tr], feats(images), f_train, order(images, groups[tr]))

        return deformed_scores(recipe, groups[tr], groups[va], f_train, feats(groups[va]),
                               order(groups[tr], groups[va])), deformed
    if recipe.get("align"):
        if key + (tr, "scoring") not in fitted:
            fitted[key + (tr, "scoring")] = fit_detector(scoring_recipe(recipe), groups[tr], seed=seed,
                                                         encoders=encoders)
        s_feats = fitted[key + (tr, "scoring")]
        s_train = s_feats(groups[tr])

        def aligned(images: np.ndarray) -> np.ndarray:
            return aligned_scores(recipe, images, groups[tr], feats(images), f_train, s_feats(images), s_train, ranked)

        # the null of the same search: each training image against its validation candidates
        return aligned_scores(recipe, groups[tr], groups[va], f_train, feats(groups[va]), s_train,
                              s_feats(groups[va]), ranked), aligned

    def correlate(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        if recipe.get("blend"):  # each query's best blend of two references (match(blend=...))
            return blend_correlation(query, reference, device="cpu")[0]
        return topk_correlation(query, reference, 1, device="cpu")[0][:, 0]

    def best(images: np.ndarray) -> np.ndarray:
        return correlate(feats(images), f_train)

    if recipe.get("calibration", "train_to_val") == "val_to_train":  # the null of a novel image
        return best(groups[va]), best
    null = correlate(f_train, feats(groups[va]))
    for zoom in recipe.get("calibrate_lowres", []):  # the null over the validation images at a lower resolution too
        null = np.maximum(null, correlate(f_train, feats(lowres(groups[va], zoom))))
    return null, best


def lowres(images: np.ndarray, zoom: float) -> np.ndarray:
    """``images`` down-sampled to ``zoom`` of their size and back, one by one: the audit's null views
    (:func:`memscan.data.transforms.low_resolution`, the ``lowres`` view of memscan's training presets at one zoom)."""
    from memscan.data.transforms import low_resolution

    return np.stack([low_resolution(x, zoom) for x in images])


def scoring_recipe(recipe: dict) -> dict:
    """The features fused with the aligned pixels of an ``align`` recipe: its embedding alone (flip-invariant when
    the recipe is), or its ordinary features when it has no encoder."""
    if not recipe.get("encoder"):
        return {k: v for k, v in recipe.items() if k != "align"}
    return {"pixel": [], "encoder": recipe["encoder"], "embedding_weight": 1.0, "tta_flip": recipe.get("tta_flip"),
            **({"canonical": True} if recipe.get("canonical") else {})}


def _digest(images: np.ndarray) -> str:
    """A key for an image set (the align part's rankings are looked up by the images they ranked)."""
    return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()


def aligned_scores(recipe: dict, query: np.ndarray, reference: np.ndarray, q_feat: np.ndarray, r_feat: np.ndarray,
                   q_scoring: np.ndarray, r_scoring: np.ndarray, ranked: dict | None = None) -> np.ndarray:
    """Each query's best score after retrieval (top-k by the recipe's features) and geometric verification
    (``memscan.scoring.aligned_search``) on coarse images (``align["factor"]``× smaller per axis), from a deeper
    retrieval narrowed by a quick alignment where ``align["shortlist"]`` says so; ``ranked``, when given, keeps each
    query's first ``k`` candidates by that score (``AlignedMatch.ranked``) under the two image sets' keys."""
    if recipe["align"].get("scoring", "embedding") == "retrieval":  # fuse the aligned pixels with the retrieval
        q_scoring, r_scoring = q_feat, r_feat  # features' score
    k = int(recipe["align"].get("k", 5))
    found = aligned_search(query, reference, q_feat, r_feat, k=k, query_scoring=q_scoring, reference_scoring=r_scoring,
                           shortlist=recipe["align"].get("shortlist"), device="cpu",
                           **_align_arguments(recipe, query.shape[2:]))
    if ranked is not None:  # the retrieval's own k, as the audit bends them (a shortlist's added ones come after)
        ranked[(_digest(query), _digest(reference))] = found.ranked(k)
    return found.score


_BENT: dict = {}  # the last non-rigid fit: a feature_share part re-scores the pairs its plain twin just bent


def deformed_scores(recipe: dict, query: np.ndarray, reference: np.ndarray, q_feat: np.ndarray,
                    r_feat: np.ndarray, ranked: np.ndarray | None = None) -> np.ndarray:
    """Each query's best score over its top-k candidates after a non-rigid fit
    (``memscan.scoring.deform_and_correlate`` with the recipe's ``deform`` settings but ``k``): the first k of
    ``ranked`` (the align part's ranking, as the audit bends them) or else the top k by the recipe's features, and with
    a ``band_k`` the band-passed pixels' best of the audit's retrieval list (``memscan.scoring.bend_candidates``). With
    the recipe's ``feature_share`` (``memscan.audit.BENT_FEATURE_SHARE``) each bent pair scores that share of its
    feature correlation and the rest of its bent score, as the audit's third refine column."""
    from memscan.audit import _bent_feature_mix, _retrieval_depth, _score_align_axes

    settings = {key: v for key, v in recipe["deform"].items() if key not in BEND_CHOICE}
    choice = {"k": 5, **{key: v for key, v in recipe["deform"].items() if key in BEND_CHOICE}}
    ranked = topk_correlation(q_feat, r_feat, int(choice["k"]), device="cpu")[1] if ranked is None else ranked
    pool = None
    if choice.get("band_k"):  # and the band-passed pixels' best of the audit's retrieval list
        depth = _retrieval_depth(_score_align_axes("best-of-aligned", {}, query.ndim - 2))
        pool = topk_correlation(q_feat, r_feat, min(depth, len(r_feat)), device="cpu")[1]
    idx = bend_candidates(query, reference, ranked, pool, device="cpu", **choice)
    key = (_digest(query), _digest(reference), _digest(idx), repr(sorted(settings.items())))
    if key not in _BENT:
        _BENT.clear()
        _BENT[key] = deform_and_correlate(query, reference, idx, device="cpu", **settings)
    bent = _BENT[key]
    share = recipe.get("feature_share")
    if share is None:
        return bent.score
    q, r = standardize_rows(q_feat), standardize_rows(r_feat)
    values = np.einsum("nd,nkd->nk", q.astype(np.float64), r[np.maximum(bent.candidates, 0)].astype(np.float64))
    return _bent_feature_mix(bent, values, share)[0]  # the audit's own mix (-1 candidates: -inf)


def _align_arguments(recipe: dict, spatial) -> dict:
    """``align_and_correlate`` keyword arguments of a recipe's ``align`` part: ``size`` = the images ``factor``×
    smaller per axis, the mirror when the recipe is flip-invariant, ``highpass`` = (σ px at that size, share of the
    high-passed pixels; see bandpass_study.py), and the remaining entries (``weights``, grids) as they are."""
    a = {key: v for key, v in recipe["align"].items() if key not in ("factor", "k", "scoring", "highpass",
                                                                    "shortlist")}
    a["size"] = [max(2, n // recipe["align"].get("factor", 2)) for n in spatial]
    a["flip_axes"] = (-1,) if recipe.get("tta_flip") else ()
    highpass = recipe["align"].get("highpass")
    if highpass:  # the product's joint search: (1 - w) plain + w high-passed pixels at the same warp and shift
        a["highpass"], a["highpass_weight"] = float(highpass[0]), float(highpass[1])
    return a


def match_recipe(recipe: dict, train: np.ndarray, val: np.ndarray, queries: np.ndarray, seed: int = 0,
                 **match_kwargs):
    """``memscan.metrics.match`` of ``queries`` against ``train`` with τ from ``val``, scored as the recipe says,
    the way ``memscan audit`` runs it: a plain recipe matches its features; a ``max_of`` recipe passes its plain parts
    as ``best_of`` sets and its ``align`` part (at most one) as ``refine`` on that part's retrieval features, which
    are then the first set (``--score best-of`` / ``best-of-aligned``); a plain part's ``calibrate_lowres`` gives
    its ``null_views`` (the audit's :data:`~memscan.audit.NULL_LOW_RESOLUTION`), its ``blend`` scores it as blends
    of two references (``match(blend=...)``, the audit's :data:`~memscan.audit.BLEND_PIXELS`) and its ``ranks`` on
    its rows' ranks (the audit's :data:`~memscan.audit.RANK_PIXELS`). A recipe's
    ``headroom`` is ``match``'s (``--headroom``). Indices come with the scores, so the DDPM audit can compare
    nearest training images."""
    from memscan.audit import _aligned_refine  # the audit's own re-scoring of candidates
    from memscan.metrics import match

    recipe = recipe_for(recipe, train.ndim - 2)  # the case's dimensionality (e.g. memscan's deform settings)
    parts = recipe.get("max_of") or [recipe]
    images = {"train": train, "val": val, "synthetic": queries}
    encoders: dict = {}
    plain, views, blend, aligned = [], [], [], None
    # deform parts are scored by the aligned part's refine: the bent pairs, and their feature_share twin's mix
    deform = [part for part in parts if part.get("deform") and part.get("feature_share") is None]
    mixed = [part for part in parts if part.get("deform") and part.get("feature_share") is not None]
    if len(deform) > 1 or (deform and not any(part.get("align") for part in parts)):
        raise ValueError("a max_of recipe takes at most one deform part, beside an align part")
    if len(mixed) > 1 or (mixed and (not deform or mixed[0]["deform"] != deform[0]["deform"])):
        raise ValueError("a feature_share part re-scores the deform part's pairs: one, with the same deform settings")
    for part in parts:
        if part.get("deform"):
            continue
        feats = fit_detector({k: v for k, v in part.items() if k != "align"}, train, seed=seed, encoders=encoders)
        if part.get("ranks"):  # the audit's RANK_PIXELS set
            feats = _ranked(feats)
        triple = tuple(feats(images[k]) for k in images)
        if part.get("align"):
            if aligned is not None:
                raise ValueError("a max_of recipe takes at most one align part")
            aligned = (part, triple)
        else:
            if part.get("blend"):
                blend.append(len(plain))  # its index among the plain parts
            plain.append(triple)
            views.append([feats(lowres(val, zoom)) for zoom in part.get("calibrate_lowres", [])])
    match_kwargs = {"headroom": float(recipe.get("headroom", 0.0)), **match_kwargs}
    if aligned is None:
        blend = [b - 1 for b in blend]  # the first plain part is match's matched features, the rest its best_of
        if views[0]:
            raise ValueError("calibrate_lowres applies to a max_of recipe's best_of sets, not its first part")
        if blend and blend[0] < 0:
            raise ValueError("blend applies to a max_of recipe's best_of sets, not its first part")
        return match(*plain[0], best_of=plain[1:] or None, null_views=views[1:] if any(views) else None,
                     blend=blend, **match_kwargs)
    part, primary = aligned
    if part["align"].get("scoring", "embedding") != "retrieval":
        raise ValueError("match_recipe supports align parts scored with their retrieval features only")
    axes = _align_arguments(part, train.shape[2:])
    if deform:  # the audit's fifth score: the same candidates bent onto their query (refine's second column)
        if int(deform[0]["deform"].get("k", 5)) > int(part["align"].get("k", 5)):
            raise ValueError("the deform part verifies at most as many candidates as the align part")
        axes["deform"] = {**deform[0]["deform"], **({"feature_share": mixed[0]["feature_share"]} if mixed else {})}
    k, shortlist = int(part["align"].get("k", 5)), part["align"].get("shortlist")
    if shortlist:  # a deeper retrieval, narrowed by a quick alignment (the audit's 2D default)
        axes["shortlist"] = {**shortlist, "keep": k}
    refine = _aligned_refine(images, axes)
    return match(*primary, refine=refine, refine_k=shortlist_depth(k, shortlist), best_of=plain or None,
                 null_views=views if any(views) else None, blend=blend, **match_kwargs)


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


def seed_table(summaries: dict[int, pd.DataFrame], names: list[str],
               points: dict[str, dict[int, pd.DataFrame]] | None = None,
               oracle: dict[int, pd.DataFrame] | None = None) -> str:
    """Markdown table of a study repeated over seeds: per family, each detector's AUROC as mean ± sd over the seeds
    (each seed's value itself a mean over permutations), its worst seed, and the mean recall at τ; then overall
    recall / FPR as mean ± sd, the same at each other operating point, and, per seed, how many families reach AUROC
    ≥ 0.99.

    Args:
        summaries: :func:`summarize` output per seed.
        names: detectors, in column order.
        points: per label (e.g. ``"τ at p99"``, see :func:`operating_points`) the seeds' :func:`summarize` output
            at that τ.
        oracle: per seed, :func:`fpr_at_recall` output: adds the FPR at an oracle τ (mean over permutations, mean ±
            sd over seeds, and the worst permutation of any seed).
    """
    per = pd.concat([sm.assign(seed=s) for s, sm in summaries.items()], ignore_index=True)
    fams = _families(per)
    stats = per.groupby(["detector", "family"]).agg(mean=("auroc", "mean"), sd=("auroc", "std"),
                                                     worst=("auroc", "min"), recall=("recall", "mean"))
    lines = ["| family | " + " | ".join(f"{d} AUROC mean ± sd (worst) / recall" for d in names) + " |",
             "|---|" + "---|" * len(names)]
    for fam in fams:
        cells = (stats.loc[(d, fam)] for d in names)
        lines.append(f"| {fam} | " + " | ".join(
            f"{c['mean']:.3f} ± {c['sd']:.3f} ({c['worst']:.3f}) / {c['recall']:.2f}" for c in cells) + " |")
    for label, sums in {"τ": summaries, **(points or {})}.items():
        at = pd.concat(list(sums.values()), ignore_index=True)
        over = at[at["family"] == "overall"].groupby("detector")[["recall", "fpr"]].agg(["mean", "std"])
        lines.append(f"| overall recall / FPR at {label}, mean ± sd | " + " | ".join(
            f"{over.loc[d, ('recall', 'mean')]:.2f} ± {over.loc[d, ('recall', 'std')]:.2f} / "
            f"{over.loc[d, ('fpr', 'mean')]:.2f} ± {over.loc[d, ('fpr', 'std')]:.2f}" for d in names) + " |")
    if oracle:
        at = pd.concat([o.assign(seed=s) for s, o in oracle.items()], ignore_index=True)
        mean = at.groupby(["detector", "seed"])["fpr"].mean().groupby("detector").agg(["mean", "std"])
        worst = at.groupby("detector")["fpr"].max()
        lines.append("| FPR at the τ giving recall 0.95 (oracle), mean ± sd (worst permutation) | " + " | ".join(
            f"{mean.loc[d, 'mean']:.2f} ± {mean.loc[d, 'std']:.2f} ({worst.loc[d]:.2f})" for d in names) + " |")
    fam_only = per[per["family"] != "overall"]
    goal = (fam_only["auroc"] >= 0.99).groupby([fam_only["detector"], fam_only["seed"]]).sum()
    lines.append("| families at AUROC ≥ 0.99, per seed | " + " | ".join(
        ", ".join(str(int(goal.loc[(d, s)])) for s in summaries) for d in names) + " |")
    return "\n".join(lines)


def fpr_at_recall(scores: pd.DataFrame, recall: float = 0.95) -> pd.DataFrame:
    """FPR on the unseen subject at the τ that would give exactly ``recall`` of the copies (an oracle τ read off the
    copies themselves, per detector and permutation, all families pooled): how far the ranking alone would get if τ
    were calibrated perfectly, against the FPR at the validation subject's τ.

    Returns:
        One row per detector and permutation: detector, perm, tau_oracle, fpr.
    """
    rows = []
    for (det, perm), g in scores.groupby(["detector", "perm"]):
        pos, neg = g.loc[g["label"] == 1, "score"].to_numpy(), g.loc[g["label"] == 0, "score"].to_numpy()
        k = int(np.floor((1.0 - recall) * len(pos) + 1e-9))  # the k lowest copies may fall below: recall ≥ `recall`
        tau = float(np.sort(pos)[k])
        rows.append({"detector": det, "perm": perm, "tau_oracle": tau, "fpr": float((neg >= tau).mean())})
    return pd.DataFrame(rows)


def _families(per: pd.DataFrame) -> list[str]:
    """The families of a summary in their order, ``"overall"`` last."""
    return [f for f in per["family"].unique() if f != "overall"] + ["overall"]


def headroom_label(headroom: float) -> str:
    """The :func:`operating_points` label of τ raised by ``headroom``."""
    return f"τ + {headroom:g} (1 − τ)"


def operating_points(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """:func:`score_case` output with τ replaced by each stricter operating point, by label: the 99th and 100th
    percentile of the same null (:data:`STRICTER_PERCENTILES`) and the 95th percentile raised by each of
    :data:`HEADROOMS` (instead of a recipe's own headroom, not on top of it)."""
    points = {f"τ at p{q:g}": scores.assign(tau=scores[f"tau_p{q:g}"]) for q in STRICTER_PERCENTILES}
    base = scores["tau_percentile"] if "tau_percentile" in scores else scores["tau"]  # older caches: no headroom
    points.update({headroom_label(h): scores.assign(tau=with_headroom(base, h)) for h in HEADROOMS})
    return points


def rates_table(summaries: dict[int, pd.DataFrame], names: list[str]) -> str:
    """Markdown: per family, each detector's recall / FPR at τ (mean over seeds of the mean over permutations), and
    per detector the families meeting recall ≥ 0.95 with FPR ≤ 0.05.

    Args:
        summaries: :func:`summarize` output per seed, all at one operating point.
        names: detectors, in column order.
    """
    per = pd.concat(list(summaries.values()), ignore_index=True)
    rates = per.groupby(["detector", "family"])[["recall", "fpr"]].mean()
    fams = _families(per)
    lines = ["| family | " + " | ".join(f"{d} recall / FPR" for d in names) + " |", "|---|" + "---|" * len(names)]
    for fam in fams:
        lines.append(f"| {fam} | " + " | ".join(
            f"{rates.loc[(d, fam), 'recall']:.2f} / {rates.loc[(d, fam), 'fpr']:.2f}" for d in names) + " |")
    ok = [sum(rates.loc[(d, f), "recall"] >= 0.95 and rates.loc[(d, f), "fpr"] <= 0.05 for f in fams[:-1])
          for d in names]
    lines.append("| families with recall ≥ 0.95 and FPR ≤ 0.05 | " + " | ".join(str(n) for n in ok) + " |")
    return "\n".join(lines)
