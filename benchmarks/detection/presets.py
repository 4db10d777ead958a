"""Detector recipes compared by the detection benchmark.

A recipe is a plain dict:

- ``pixel``: list of ``[factor, weight]`` pixel blocks (factor 1 = full resolution, 4 = area-downsampled 4× per axis).
- ``encoder``: None, or the contrastive encoder's settings (``widths`` of a MONAI basic-block ResNet scaled to the CPU,
  ``embedding_dim``, ``steps``, ``temperature``, ``lr``, ``augment`` = a key of ``detectors.AUGMENTATIONS``).
- ``embedding_weight``: weight of the embedding block in the fused score (see ``memscan.scoring.fuse_features``).
- ``tta_flip``: score with left-right flip-invariant features (``memscan.scoring.flip_invariant_features``).

``PAPER`` reproduces Dar et al.'s recipe (±5° rotation + horizontal flip views, NT-Xent at T = 0.07, 128-d 2D /
32-d 3D embedding, Pearson on the embedding alone) with the network scaled to the CPU; ``PIXEL`` is the pixel-space
Pearson baseline; ``CANDIDATES`` are the levers measured by ``run.py --levers``; ``DEFAULT`` is the winner.
"""

from __future__ import annotations

import copy

__all__ = ["PIXEL", "PAPER", "DEFAULT", "CANDIDATES", "recipe_for"]

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
    # the current memscan.training "default" preset's views and temperature (memscan.data view families)
    "memscan_preset_default": {**PAPER, "encoder": {**_ENCODER, "augment": "memscan:default", "temperature": 0.1}},
    "fused_tta_emb2": {"pixel": [[4, 1.0]], "encoder": {**_ENCODER, "augment": "artefacts"},
                       "embedding_weight": 2.0, "tta_flip": True},
}

# the recommended memscan default, the lever study's best overall AUROC at low FPR (docs/benchmarks/detection_levers.md):
# artefact-matched views, coarse pixels (4x downsampled) fused with the embedding at weight 1:2, flip-invariant scoring
DEFAULT: dict = copy.deepcopy(CANDIDATES["fused_tta_emb2"])


def recipe_for(recipe: dict, spatial_dims: int) -> dict:
    """The recipe adapted to 3D: the paper's 3D embedding is 32-d."""
    r = copy.deepcopy(recipe)
    if spatial_dims == 3 and r.get("encoder"):
        r["encoder"]["embedding_dim"] = min(r["encoder"]["embedding_dim"], 32)
    return r
