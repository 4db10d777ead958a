"""Detector recipes compared by the detection benchmark.

A recipe is a plain dict:

- ``pixel``: list of ``[factor, weight]`` pixel blocks (factor 1 = full resolution, 4 = area-downsampled 4× per axis).
- ``encoder``: None, or the contrastive encoder's settings (``widths`` of a MONAI basic-block ResNet scaled to the CPU,
  ``embedding_dim``, ``steps``, ``temperature``, ``lr``, ``augment`` = a key of ``detectors.AUGMENTATIONS``).
- ``embedding_weight``: weight of the embedding block in the fused score (see ``memscan.scoring.fuse_features``).
- ``tta_flip``: score with left-right flip-invariant features (``memscan.scoring.flip_invariant_features``).
- ``ranks``: score each feature row's ranks within it (Spearman; ``memscan.audit.RANK_PIXELS``).
- ``align``: optional test-time geometric alignment (see :data:`ALIGN`): the score of a query is its best
  retrieval candidate after aligning the coarse pixels; τ comes from the same search on training vs validation.

``PAPER`` reproduces Dar et al.'s recipe (±5° rotation + horizontal flip views, NT-Xent at T = 0.07, 128-d 2D /
32-d 3D embedding, Pearson on the embedding alone) with the network scaled to the CPU; ``PIXEL`` is the pixel-space
Pearson baseline; ``CANDIDATES`` are the levers measured by ``run.py --levers``.

``DEFAULT`` is exactly what memscan runs by default, derived from the package rather than copied: the views of
``memscan.training.PRESETS["default"]`` (``augment "memscan:default"`` = ``memscan.data.view_transforms(augment=
"default")``), its NT-Xent temperature, the score of ``memscan.audit.audit``'s default (``memscan.audit.DEFAULT_SCORE``,
see :func:`memscan_recipe`) and that score's threshold headroom (``memscan.audit.default_headroom``). Only the network
is CPU-sized like every encoder here. ``MEMSCAN_SCORES`` holds the audit's scores on those views (at τ, no headroom;
``run.py`` runs the default and the fused score, the encoder trained once).
"""

from __future__ import annotations

import copy
import inspect

from memscan.audit import (ALIGN_DEFORM, ALIGN_HIGHPASS, ALIGN_HIGHPASS_WEIGHT, ALIGN_REFINE_ROUNDS, ALIGN_SHORTLIST,
                           BLEND_PIXELS, FUSED_WEIGHTS, NULL_LOW_RESOLUTION, RANK_PIXELS, _score_align_axes,
                           audit, default_headroom)
from memscan.training import PRESETS

__all__ = ["PIXEL", "PAPER", "DEFAULT", "DEFAULT_SCORE", "MEMSCAN_SCORES", "CANDIDATES", "memscan_recipe",
           "recipe_for", "ALIGN"]

_ENCODER = {
    "widths": [32, 64, 128, 256],
    "embedding_dim": 128,
    "steps": 150,
    "temperature": 0.07,
    "lr": 1e-3,
    "batch_size": 64,
    "augment": "memscan:paper",
}

PIXEL: dict = {"pixel": [[1, 1.0]], "encoder": None, "embedding_weight": 0.0, "tta_flip": False}
#: pixel Pearson at a quarter of the size per axis (best-of-aligned's second pixel set)
_PIXEL_QUARTER: dict = {**copy.deepcopy(PIXEL), "pixel": [[4, 1.0]]}

PAPER: dict = {"pixel": [], "encoder": dict(_ENCODER), "embedding_weight": 1.0, "tta_flip": False}

CANDIDATES: dict[str, dict] = {
    # one lever at a time, starting from the paper recipe
    "paper_T0.2": {**PAPER, "encoder": {**_ENCODER, "temperature": 0.2}},
    "paper_tta": {**PAPER, "tta_flip": True},
    "broad_aug": {**PAPER, "encoder": {**_ENCODER, "augment": "artefacts"}},
    "broad_aug_T0.2": {**PAPER, "encoder": {**_ENCODER, "augment": "artefacts", "temperature": 0.2}},
    "broad_aug_long": {**PAPER, "encoder": {**_ENCODER, "augment": "artefacts", "steps": 400}},
    "broad_aug_d32": {**PAPER, "encoder": {**_ENCODER, "augment": "artefacts", "embedding_dim": 32}},
    "broad_aug_tta": {**PAPER, "encoder": {**_ENCODER, "augment": "artefacts"}, "tta_flip": True},
    "pixel_coarse4": {**PIXEL, "pixel": [[4, 1.0]]},
    "pixel_multiscale_tta": {**PIXEL, "pixel": [[1, 1.0], [4, 1.0]], "tta_flip": True},
    "fused_tta": {"pixel": [[4, 1.0]], "encoder": {**_ENCODER, "augment": "artefacts"}, "embedding_weight": 1.0,
                  "tta_flip": True},
    # memscan's previous default family list at its T = 0.1 (the families now carry the artefact-strength parameters)
    "memscan_preset_default": {**PAPER, "encoder": {**_ENCODER, "augment": "memscan:flip+rotate+affine+contrast+noise",
                                                    "temperature": 0.1}},
    "fused_tta_emb2": {"pixel": [[4, 1.0]], "encoder": {**_ENCODER, "augment": "artefacts"},
                       "embedding_weight": 2.0, "tta_flip": True},
}

#: test-time geometric alignment (``evaluate.aligned_scores`` → ``memscan.scoring.aligned_search``): top-``k``
#: candidates by the recipe's features, each aligned to the query (flip × rotation ±12° × zoom 0.8-1.25 × FFT
#: translation ≤ 15%, sub-pixel peak) on images ``factor``× smaller per axis; pair score = aligned pixel Pearson
#: fused by ``weights`` with the correlation of ``scoring`` features: ``"retrieval"`` = the recipe's own (fused)
#: features, ``"embedding"`` = its embedding alone. Chosen on 2D MRI, 1 permutation (docs/benchmarks/
#: detection_alignment.md lists the settings tried).
ALIGN: dict = {"factor": 2, "k": 5, "scoring": "retrieval", "weights": {"pixel": 1.0, "features": 1.0}}

#: marks settings that are the audit's own, resolved per dimensionality by recipe_for: a part's ``deform``
#: (``memscan.audit.ALIGN_DEFORM``) and ``feature_share``, an align part's ``shortlist``
_MEMSCAN_DEFORM = "memscan"

#: the score ``memscan audit`` uses when none is given
DEFAULT_SCORE: str = inspect.signature(audit).parameters["score"].default


def memscan_recipe(score: str, feature_share: bool = True, shortlist: bool = True, ranks: bool = True) -> dict:
    """memscan's default training views and temperature with one of the audit's scores (``embedding``, ``fused``,
    ``best-of``, ``best-of-aligned``); ``feature_share``: best-of-aligned's fused features mixed into its bent pairs'
    score where ``memscan.audit.BENT_FEATURE_SHARE`` does so (resolved by :func:`recipe_for`), or False: their own
    correlation as a part in every dimensionality (the default until round 21); ``shortlist``: its alignment's
    retrieval as deep as ``memscan.audit.ALIGN_SHORTLIST`` says (resolved by :func:`recipe_for`), or False: the fused
    features' first 5 only (the default until round 23); ``ranks``: best-of-aligned's full-size pixels scored on their
    ranks too where ``memscan.audit.RANK_PIXELS`` says so, or False: not (the default until round 24).

    The temperature is the 2D preset's here; :func:`recipe_for` takes the preset of the case's dimensionality.
    """
    enc = {**_ENCODER, "augment": "memscan:default", "temperature": PRESETS["default"][2]["temperature"],
           "memscan_preset": "default"}
    if score == "embedding":
        return {"pixel": [], "encoder": enc, "embedding_weight": 1.0, "tta_flip": False}
    if score == "fused":  # memscan.audit.score_features: pixels at size // 4 (w 1) + embedding (w 2), flip-invariant
        return {"pixel": [[4, FUSED_WEIGHTS["pixel"]]], "encoder": enc, "embedding_weight": FUSED_WEIGHTS["embedding"],
                "tta_flip": True}
    if score == "best-of":  # match(best_of=[pixels]): the better of pixel Pearson (best_of_pixel_size keeps the
        # benchmark's images whole) and the fused score, each scaled by its own τ_b
        return {"max_of": [copy.deepcopy(PIXEL), memscan_recipe("fused")], "normalize": "ceiling"}
    if score == "best-of-aligned":  # match(refine=aligned pixels, best_of=[pixels, quarter-size pixels, fused]): the
        # best of pixel Pearson at best_of_pixel_sizes (the benchmark's images whole and at a quarter per axis), the
        # fused score and the aligned high-passed pixels (ALIGN_HIGHPASS*) of the fused features' top candidates
        # (alignment_size(..., "best-of-aligned") = the benchmark's images whole), each scaled by its own τ_b, and
        # the same candidates bent onto their query (ALIGN_DEFORM of the case's dimensionality, see recipe_for); the
        # two pixel parts calibrate on the validation images at NULL_LOW_RESOLUTION too (match(null_views=...)), and
        # the full-size one scores each image by its best blend of two training images (BLEND_PIXELS: match(blend=[0]));
        # the full-size pixels' ranks are one more part (RANK_PIXELS)
        pixels = [{**copy.deepcopy(part), "calibrate_lowres": list(NULL_LOW_RESOLUTION)}
                  for part in (PIXEL, _PIXEL_QUARTER)]
        if BLEND_PIXELS:
            pixels[0]["blend"] = True
        # the full-size pixels' ranks, on the same low-resolution null views (last: a max, so the order is free)
        ranked = [{**copy.deepcopy(PIXEL), "calibrate_lowres": list(NULL_LOW_RESOLUTION), "ranks": True}
                  ] if RANK_PIXELS and ranks else []
        aligned = {**memscan_recipe("fused"), "align": {**ALIGN, "factor": 1,
                                                        "weights": {"pixel": 1.0, "features": 0.0},
                                                        "highpass": [ALIGN_HIGHPASS, ALIGN_HIGHPASS_WEIGHT],
                                                        "refine_rounds": ALIGN_REFINE_ROUNDS,
                                                        **({"shortlist": _MEMSCAN_DEFORM} if shortlist else {})}}
        bent = {**memscan_recipe("fused"), "deform": _MEMSCAN_DEFORM}
        if not feature_share:  # the fused features' own correlation as a part
            return {"max_of": [*pixels, memscan_recipe("fused"), aligned, bent, *ranked], "normalize": "ceiling"}
        # the fused features through the bent pairs where BENT_FEATURE_SHARE mixes them, else their own correlation
        # (recipe_for resolves it per dimensionality, as the audit does); after the bent part, whose pairs it re-scores
        return {"max_of": [*pixels, aligned, bent, {**bent, "feature_share": _MEMSCAN_DEFORM}, *ranked],
                "normalize": "ceiling"}
    raise ValueError(f"unknown score {score!r}")


MEMSCAN_SCORES: dict[str, dict] = {score: memscan_recipe(score)
                                   for score in ("embedding", "fused", "best-of", "best-of-aligned")}


def _single(part: dict) -> dict:
    """A part of best-of-aligned as before round 18: correlated with one training image at a time (no blend)."""
    return {k: copy.deepcopy(v) for k, v in part.items() if k != "blend"}


def _sharp_null(part: dict) -> dict:
    """A part of best-of-aligned as before round 17: one training image at a time, calibrated on the validation
    images as they are only."""
    return {k: v for k, v in _single(part).items() if k != "calibrate_lowres"}


# what memscan runs by default (training preset "default" + the audit's default score and its headroom)
DEFAULT: dict = {**copy.deepcopy(MEMSCAN_SCORES[DEFAULT_SCORE]),
                 **({"headroom": default_headroom(DEFAULT_SCORE)} if default_headroom(DEFAULT_SCORE) else {})}
#: the round-20 default: best-of-aligned with the fused features' own correlation as a part (from round 21 they count
#: in 2D only through the pairs the non-rigid fit bent, ``memscan.audit.BENT_FEATURE_SHARE``) and the fused features'
#: first 5 candidates aligned (deeper in 2D from round 24, ``memscan.audit.ALIGN_SHORTLIST``); the earlier rounds'
#: candidates below are built from it
_ROUND20: dict = {**copy.deepcopy(DEFAULT), "max_of": memscan_recipe("best-of-aligned", feature_share=False,
                                                                     shortlist=False, ranks=False)["max_of"]}
CANDIDATES["best_of_aligned_fused"] = copy.deepcopy(_ROUND20)
#: the round-23 default: today's without the shortlist (detection_candidates.md section 22) and the ranks
CANDIDATES["best_of_aligned_no_shortlist"] = {**copy.deepcopy(DEFAULT), "max_of": memscan_recipe(
    "best-of-aligned", shortlist=False, ranks=False)["max_of"]}
#: the round-24 default: today's without the ranks of the full-size pixels (detection_candidates.md section 23)
CANDIDATES["best_of_aligned_no_ranks"] = {**copy.deepcopy(DEFAULT),
                                          "max_of": memscan_recipe("best-of-aligned", ranks=False)["max_of"]}

#: lever (round 13, adopted as ``memscan.audit.ALIGN_REFINE_ROUNDS``): best-of-aligned whose alignment refines each
#: pair's best rotation and zoom coarse-to-fine (``align_and_correlate(refine_rounds=2)``: half, then a quarter of a
#: grid step), for copies zoomed or rotated between two grid values (the benchmark's weak crop, a 1.11× zoom, falls
#: between the grid's 1.077 and 1.16); ``best_of_four_hp_f1_px4`` is the same score on the grid alone (round 12's)
CANDIDATES["best_of_aligned_refined"] = {"max_of": [_sharp_null(p) for p in _ROUND20["max_of"] if not p.get("deform")],
                                         "normalize": "ceiling"}

CANDIDATES["memscan_default_aligned"] = {**copy.deepcopy(MEMSCAN_SCORES["fused"]), "align": copy.deepcopy(ALIGN)}
CANDIDATES["memscan_default_aligned_emb"] = {**copy.deepcopy(MEMSCAN_SCORES["fused"]),
                                             "align": {**copy.deepcopy(ALIGN), "scoring": "embedding"}}
#: lever (bandpass_study.py): the aligned pixel term 2:1 plain : high-pass (coarse image minus its σ 2 px blur). Measured
#: in round 7 with two searches (plain, then high-passed); ``evaluate.aligned_scores`` now runs the product's one
#: joint search (``align_and_correlate(highpass_weight=1/3)``), so a rerun differs slightly from detection_alignment.md
CANDIDATES["memscan_default_aligned_hp"] = {**copy.deepcopy(MEMSCAN_SCORES["fused"]),
                                            "align": {**copy.deepcopy(ALIGN), "highpass": [2.0, 1 / 3]}}


#: lever: the best of two detectors' scores, each first put on a scale anchored at its own null (see
#: ``evaluate.null_normalized``): pixel Pearson and the fused score. ``memscan_best_of`` (the "ceiling" scale) is
#: ``memscan audit --score best-of``; ``best_of_spread`` scales by the null's upper half instead
CANDIDATES["memscan_best_of"] = copy.deepcopy(MEMSCAN_SCORES["best-of"])
CANDIDATES["best_of_spread"] = {**copy.deepcopy(MEMSCAN_SCORES["best-of"]), "normalize": "spread"}

#: lever: best-of with the fused score after test-time alignment (memscan --score aligned) in place of the plain fused
CANDIDATES["best_of_aligned"] = {"max_of": [copy.deepcopy(PIXEL), copy.deepcopy(CANDIDATES["memscan_default_aligned"])],
                                 "normalize": "ceiling"}
#: lever: Pearson of the features minus the training set's mean feature vector (the population component that
#: every image of the anatomy shares), on pixels, the fused score, its embedding alone and the best-of score
CANDIDATES["pixel_centered"] = {**copy.deepcopy(PIXEL), "center": 1.0}
CANDIDATES["memscan_fused_centered"] = {**copy.deepcopy(MEMSCAN_SCORES["fused"]), "center": 1.0}
CANDIDATES["memscan_fused_centered_half"] = {**copy.deepcopy(MEMSCAN_SCORES["fused"]), "center": 0.5}
CANDIDATES["memscan_embedding_centered"] = {**copy.deepcopy(MEMSCAN_SCORES["embedding"]), "center": 1.0}
CANDIDATES["best_of_centered"] = {"max_of": [{**copy.deepcopy(PIXEL), "center": 1.0},
                                             {**copy.deepcopy(MEMSCAN_SCORES["fused"]), "center": 1.0}],
                                  "normalize": "ceiling"}

#: lever: τ from the other direction, the 95th percentile of each validation image's best training score (the null
#: of a novel query, like for like with the copy test) instead of each training image's best validation score
CANDIDATES["memscan_default_v2t"] = {**copy.deepcopy(DEFAULT), "calibration": "val_to_train"}


def recipe_for(recipe: dict, spatial_dims: int) -> dict:
    """The recipe adapted to the dimensionality: the paper's (and memscan's) 3D embedding is 32-d; a memscan preset's
    temperature is that preset's for ``spatial_dims``; a part whose ``deform`` is memscan's takes
    ``memscan.audit.ALIGN_DEFORM`` of ``spatial_dims`` (and is left out where that is None); an align part whose
    ``shortlist`` is memscan's takes ``memscan.audit.ALIGN_SHORTLIST`` of ``spatial_dims`` (none where None); a
    part whose ``feature_share`` is memscan's takes ``memscan.audit.BENT_FEATURE_SHARE`` of ``spatial_dims``, or
    becomes the plain features it mixes in where that (or the non-rigid fit) is None, as in the audit."""
    r = copy.deepcopy(recipe)
    if r.get("max_of"):
        parts = []
        for sub in r["max_of"]:
            if sub.get("feature_share") == _MEMSCAN_DEFORM:  # the audit's own mix of this dimensionality, or none
                share = _score_align_axes("best-of-aligned", {}, spatial_dims).get("deform", {}).get("feature_share")
                sub = {k: v for k, v in sub.items() if k not in ("deform", "feature_share")} if share is None else \
                    {**sub, "feature_share": share}
            if sub.get("deform") != _MEMSCAN_DEFORM or ALIGN_DEFORM[spatial_dims]:
                parts.append(sub)
        r["max_of"] = [recipe_for(sub, spatial_dims) for sub in parts]
    if r.get("deform") == _MEMSCAN_DEFORM:
        r["deform"] = dict(ALIGN_DEFORM[spatial_dims])
    if r.get("align", {}).get("shortlist") == _MEMSCAN_DEFORM:  # the audit's retrieval depth, or none
        shortlist = ALIGN_SHORTLIST[spatial_dims]
        r["align"] = {k: v for k, v in r["align"].items() if k != "shortlist"}
        if shortlist:
            r["align"]["shortlist"] = dict(shortlist)
    enc = r.get("encoder")
    if enc:
        if spatial_dims == 3:
            enc["embedding_dim"] = min(enc["embedding_dim"], 32)
        if enc.get("memscan_preset"):
            enc["temperature"] = PRESETS[enc.pop("memscan_preset")][spatial_dims]["temperature"]
    return r

#: lever: aligned plain pixels alone (the fused features only retrieve the 5 candidates), and the best of three scores,
#: each scaled by its own null: plain pixel Pearson (mixtures, detail loss, contrast), the fused score (elastic warps,
#: flips) and the aligned pixels (shift, rotation, crop/resize) — ``--score best-of-aligned`` of round 8
#: (detection_candidates.md section 6), before its aligned pixels were high-passed
_PLAIN_ALIGNED = {**copy.deepcopy(MEMSCAN_SCORES["fused"]), "align": {**ALIGN, "weights": {"pixel": 1.0, "features": 0.0}}}
CANDIDATES["aligned_pixels"] = copy.deepcopy(_PLAIN_ALIGNED)
CANDIDATES["best_of_three"] = {"max_of": [copy.deepcopy(PIXEL), copy.deepcopy(MEMSCAN_SCORES["fused"]),
                                          copy.deepcopy(_PLAIN_ALIGNED)], "normalize": "ceiling"}
#: lever: more retrieval candidates for the aligned pixels (for crop/resize copies whose source the fused features
#: might rank below 5th); alignment time grows linearly with k. Measured: no gain (detection_candidates.md section 6)
for _k in (10, 20):
    _boa = copy.deepcopy(CANDIDATES["best_of_three"])
    _boa["max_of"][2]["align"]["k"] = _k
    CANDIDATES[f"best_of_three_k{_k}"] = _boa
#: lever: the aligned part of best_of_three on high-passed coarse pixels (the coarse image minus its σ 2 px blur, see
#: bandpass_study.py), so the head outline that every subject shares no longer lines up a new subject's slice with a
#: training slice; ``_half`` / ``_quarter`` = that share of high-passed pixels in one joint search, the rest plain
#: (``align_and_correlate(highpass_weight=...)``). Pixel Pearson and the fused score keep detail loss and elastic.
for _name, _w in (("best_of_three_hp", 1.0), ("best_of_three_hp_half", 0.5), ("best_of_three_hp_quarter", 0.25)):
    _boa = copy.deepcopy(CANDIDATES["best_of_three"])
    _boa["max_of"][2]["align"]["highpass"] = [2.0, _w]  # the σ of section 7's main tables
    CANDIDATES[_name] = _boa
#: lever: the high-pass's blur σ (px at the alignment size) around section 7's 2: 1 keeps less of the outline, 3 more.
#: ``best_of_three_hp_s1`` was round 9's ``memscan audit --score best-of-aligned`` (σ 1 at half size)
for _s in (1.0, 3.0):
    _boa = copy.deepcopy(CANDIDATES["best_of_three"])
    _boa["max_of"][2]["align"]["highpass"] = [_s, 1.0]
    CANDIDATES[f"best_of_three_hp_s{int(_s)}"] = _boa
#: lever: the aligned part at the images' full size (``factor`` 1, 64² in 2D, 12×32×32 in 3D) instead of half, the
#: blur σ doubled to keep the same physical band (``_f1``) or kept at 1 px (``_f1_s1``): a crop-resized copy
#: re-aligns at the resolution it was made at. ``best_of_three_hp_f1`` is ``memscan audit --score best-of-aligned``
#: in round 10 (detection_candidates.md section 8)
for _name, _s in (("best_of_three_hp_f1", 2.0), ("best_of_three_hp_f1_s1", 1.0)):
    _boa = copy.deepcopy(CANDIDATES["best_of_three"])
    _boa["max_of"][2]["align"]["highpass"] = [_s, 1.0]
    _boa["max_of"][2]["align"]["factor"] = 1
    CANDIDATES[_name] = _boa
#: lever: pixel Pearson at half size in the best of three (``_px2``) or beside the full-size one (``best_of_four``):
#: coarser pixels are less disturbed by elastic warps and detail loss, the families where the best of three trails
#: pixel Pearson (CXR) or stays below 0.99 (MRI 3D, CT elastic)
_PIXEL_HALF = {**copy.deepcopy(PIXEL), "pixel": [[2, 1.0]]}
_boa = copy.deepcopy(CANDIDATES["best_of_three_hp_f1"])
_boa["max_of"][0] = copy.deepcopy(_PIXEL_HALF)
CANDIDATES["best_of_three_hp_f1_px2"] = _boa
_boa = copy.deepcopy(CANDIDATES["best_of_three_hp_f1"])
_boa["max_of"].insert(1, copy.deepcopy(_PIXEL_HALF))
CANDIDATES["best_of_four_hp_f1"] = _boa
#: lever: pixel Pearson at a quarter of the size (the fused score's own pixel grid, without its mirror and embedding)
#: beside the full-size one: detail loss and elastic warps leave the coarse image intact; measured alone, quarter-size
#: pixels beat full-size ones on those families in 3D, CT and CXR and trail them on mixtures. This is ``memscan audit
#: --score best-of-aligned`` from round 11 (``MEMSCAN_SCORES``; detection_candidates.md section 9)
_boa = copy.deepcopy(CANDIDATES["best_of_three_hp_f1"])
_boa["max_of"].insert(1, copy.deepcopy(_PIXEL_QUARTER))
CANDIDATES["best_of_four_hp_f1_px4"] = _boa

#: lever (round 14, not adopted): best-of-aligned plus a fifth part, the non-rigid fit
#: (``memscan.scoring.deform_and_correlate``) of the fused features' top ``k`` candidates: a smooth displacement field
#: (control points ``spacing`` px apart, each ≤ 3 px) bent onto the query on σ 2 px high-passed pixels, the pair scored
#: on σ 1 px high-passed pixels, for elastically warped copies. ``best_of_five_deform``: 12 px, 60 Adam steps, top 5;
#: ``best_of_five_deform6_k1`` / ``_k5``: 6 px, 100 smaller steps, top 1 / top 5 (detection_candidates.md section 12)
_DEFORM = {"spacing": 12.0, "max_displacement": 3.0, "iterations": 60, "fit_highpass": 2.0, "highpass": 1.0, "k": 5}


def _with_deform(settings: dict | None) -> dict:
    """The default recipe (best-of-aligned at its headroom) with its deform part's settings replaced by ``_DEFORM``
    updated by ``settings`` (in 2D and 3D alike), or without that part when ``settings`` is None."""
    extra = [] if settings is None else [{**memscan_recipe("fused"), "deform": {**_DEFORM, **settings}}]
    return {**copy.deepcopy(_ROUND20), "max_of": copy.deepcopy(CANDIDATES["best_of_aligned_refined"]["max_of"]) + extra}


CANDIDATES["best_of_five_deform"] = _with_deform({})
for _k in (1, 5):
    CANDIDATES[f"best_of_five_deform6_k{_k}"] = _with_deform({"spacing": 6.0, "iterations": 100, "learning_rate": 0.15,
                                                              "k": _k})
#: the round-15 default: best-of-aligned's four rigid parts, without its non-rigid fit (round 16 adopted it in 2D)
CANDIDATES["best_of_aligned_rigid"] = _with_deform(None)
#: lever (round 16, adopted as ``memscan.audit.ALIGN_DEFORM[2]``): the field 6 px apart fitted coarse-to-fine (σ 4
#: px, then 2 px; 60 steps each); ``_k1`` on the top candidate only
CANDIDATES["best_of_five_deform_c2f_k1"] = _with_deform({**ALIGN_DEFORM[2], "k": 1})

#: the round-16 default: every part calibrated on the validation images as they are (round 17 adds their
#: low-resolution versions to the pixel parts' null, ``memscan.audit.NULL_LOW_RESOLUTION``)
CANDIDATES["best_of_aligned_sharp_null"] = {**copy.deepcopy(_ROUND20),
                                            "max_of": [_sharp_null(p) for p in _ROUND20["max_of"]]}
#: the round-14 default (best-of-aligned at its headroom) with the alignment's circular shifts only
#: (``align_and_correlate(rewarp=False)``): the side-by-side baseline of round 15's re-warp, which correlates each
#: pair once more at its best rotation, zoom and shift without wrapping (detection_candidates.md section 13)
CANDIDATES["best_of_aligned_circular"] = copy.deepcopy(CANDIDATES["best_of_aligned_sharp_null"])
CANDIDATES["best_of_aligned_circular"]["max_of"][3]["align"]["rewarp"] = False

def _with_lowres_null(n_parts: int) -> dict:
    """The default recipe whose first ``n_parts`` parts (plain correlations) calibrate on the validation images at
    half and a quarter of their resolution too (``calibrate_lowres``)."""
    recipe = copy.deepcopy(_ROUND20)
    for part in recipe["max_of"][:n_parts]:
        part["calibrate_lowres"] = [0.5, 0.25]
    return recipe


#: lever (round 15, measured, see detection_candidates.md section 13): a new patient's blurred image gains plain
#: Pearson with every training image, so it cleared a null of sharp images; the plain parts' null then takes the
#: blurred validation images too: all three plain parts (pixels at both sizes, the fused score), or the two pixel
#: parts only (the fused score carries most elastic copies). Round 17 adopted the pixel-only variant at the training
#: view's zooms 0.6 and 0.25 instead (``memscan.audit.NULL_LOW_RESOLUTION``, section 15)
CANDIDATES["best_of_aligned_lowres_null"] = _with_lowres_null(3)
CANDIDATES["best_of_aligned_lowres_null_px"] = _with_lowres_null(2)

#: lever (round 18, adopted as ``match(blend=[0])`` of the audit's full-size pixels): a generator can superimpose two
#: memorised images (the ``mix`` family). Full-size pixel Pearson against the best blend of two training images
#: (``memscan.metrics.blend_correlation``), its null the same fit of each training image by two validation images (at
#: their low resolutions too): in place of the plain full-size pixels (the default since round 18), or as a sixth part
#: beside them (``_blend``, measured equal); ``best_of_aligned_single`` is the round-17 default, one image at a time
CANDIDATES["best_of_aligned_single"] = {**copy.deepcopy(_ROUND20), "max_of": [_single(p) for p in _ROUND20["max_of"]]}
CANDIDATES["best_of_aligned_blend"] = copy.deepcopy(CANDIDATES["best_of_aligned_single"])
CANDIDATES["best_of_aligned_blend"]["max_of"].insert(2, {**copy.deepcopy(_ROUND20["max_of"][0]), "blend": True})

#: lever (round 21, adopted in 2D as ``memscan.audit.BENT_FEATURE_SHARE``): the fused part flags a new patient's image
#: that an encoder trained on few images takes for a training one (CXR). ``best_of_aligned_no_fused`` is the round-20
#: default without that part; ``best_of_aligned_bent_features_<w>`` puts in its place each bent pair's ``w`` × fused
#: correlation + (1 − w) × bent score, in 2D and 3D alike (the product: 0.7 in 2D, none in 3D;
#: detection_candidates.md section 19)
CANDIDATES["best_of_aligned_no_fused"] = {**copy.deepcopy(_ROUND20),
                                          "max_of": [p for k, p in enumerate(_ROUND20["max_of"]) if k != 2]}
for _w in (0.3, 0.5, 0.7):
    CANDIDATES[f"best_of_aligned_bent_features_{_w:g}"] = {
        **copy.deepcopy(CANDIDATES["best_of_aligned_no_fused"]),
        "max_of": copy.deepcopy(CANDIDATES["best_of_aligned_no_fused"]["max_of"])
        + [{**copy.deepcopy(_ROUND20["max_of"][4]), "feature_share": _w}]}
