"""Perturbation families that imitate how a generator reproduces a memorized image.

Every family works on a batch ``[n, 1, *spatial]`` (2D or 3D) with MONAI array transforms, draws its random
parameters from one seeded ``numpy`` generator (replayable), and keeps intensities in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Flip,
    GaussianSmooth,
    Rand2DElastic,
    Rand3DElastic,
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    RandSpatialCrop,
    Resize,
)

__all__ = ["FAMILIES", "settings", "perturb"]

# family → strength name → parameters. "exact" and "hflip" have one strength.
FAMILIES: dict[str, dict[str, dict]] = {
    "exact": {"-": {}},
    "noise_blur": {"weak": {"sigma": 0.5, "std": 0.02}, "strong": {"sigma": 1.0, "std": 0.05}},
    "shift_rotate": {"weak": {"deg": 5.0, "shift": 0.04}, "strong": {"deg": 12.0, "shift": 0.08}},
    "hflip": {"-": {}},
    "elastic": {"weak": {"magnitude": 0.7}, "strong": {"magnitude": 1.5}},
    "gamma_contrast": {"weak": {"gamma": (0.75, 1.35)}, "strong": {"gamma": (0.45, 2.2)}},
    "crop_resize": {"weak": {"scale": 0.9}, "strong": {"scale": 0.8}},
    "detail_loss": {"weak": {"factor": 2}, "strong": {"factor": 4}},
    "mix": {"weak": {"alpha": 0.8}, "strong": {"alpha": 0.65}},
}


def settings(families: list[str] | None = None) -> list[tuple[str, str]]:
    """All (family, strength) pairs, in table order."""
    return [(f, s) for f in (families or list(FAMILIES)) for s in FAMILIES[f]]


def _seeded(transform, rng: np.random.Generator):
    transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
    return transform


def _one(img: torch.Tensor, family: str, p: dict, rng: np.random.Generator, partner: torch.Tensor | None):
    dims = img.ndim - 1
    spatial = img.shape[1:]
    if family == "exact":
        return img
    if family == "noise_blur":
        out = GaussianSmooth(sigma=p["sigma"])(img)
        return _seeded(RandGaussianNoise(prob=1.0, mean=0.0, std=p["std"], sample_std=False), rng)(out)
    if family == "shift_rotate":
        rad = np.deg2rad(p["deg"])
        # rotate in the axial (last two axes) plane only, so 2D and 3D get the same in-plane motion
        rot = rad if dims == 2 else (rad, 0.0, 0.0)
        shift = [p["shift"] * s for s in spatial]
        if dims == 3:
            shift[0] = 0.0
        t = RandAffine(prob=1.0, rotate_range=rot, translate_range=shift, padding_mode="zeros")
        return _seeded(t, rng)(img)
    if family == "hflip":
        return Flip(spatial_axis=dims - 1)(img)
    if family == "elastic":
        if dims == 2:
            t = Rand2DElastic(spacing=max(4, spatial[-1] // 5), magnitude_range=(p["magnitude"], p["magnitude"]),
                              prob=1.0, padding_mode="zeros")
        else:
            t = Rand3DElastic(sigma_range=(3.0, 3.0), magnitude_range=(40 * p["magnitude"], 40 * p["magnitude"]),
                              prob=1.0, padding_mode="zeros")
        return _seeded(t, rng)(img)
    if family == "gamma_contrast":
        return _seeded(RandAdjustContrast(prob=1.0, gamma=p["gamma"]), rng)(img)
    if family == "crop_resize":
        roi = [max(2, int(round(p["scale"] * s))) for s in spatial]
        if dims == 3:
            roi[0] = spatial[0]
        out = _seeded(RandSpatialCrop(roi_size=roi, random_size=False), rng)(img)
        return Resize(spatial_size=spatial, mode="bilinear")(out)
    if family == "detail_loss":
        small = [max(2, s // p["factor"]) for s in spatial]
        out = Resize(spatial_size=small, mode="area")(img)
        return Resize(spatial_size=spatial, mode="bilinear")(out)
    if family == "mix":
        return p["alpha"] * img + (1.0 - p["alpha"]) * partner
    raise ValueError(f"unknown perturbation family {family!r}; expected one of {sorted(FAMILIES)}")


def perturb(images: np.ndarray, family: str, strength: str, seed: int = 0) -> np.ndarray:
    """Apply one (family, strength) to every image of a batch.

    Args:
        images: ``[n, 1, *spatial]`` float array in [0, 1].
        family: a key of :data:`FAMILIES`.
        strength: a key of ``FAMILIES[family]``.
        seed: seeds every random draw (partners for ``mix`` are other images of the same batch).

    Returns:
        ``float32`` array of the same shape, clipped to [0, 1].
    """
    if family not in FAMILIES or strength not in FAMILIES[family]:
        raise ValueError(f"unknown setting {family}/{strength}; expected one of {settings()}")
    rng = np.random.default_rng(seed)
    p = FAMILIES[family][strength]
    n = len(images)
    batch = torch.as_tensor(np.asarray(images, dtype=np.float32))
    out = []
    for i in range(n):
        partner = None
        if family == "mix":
            # the partner is a different image, at least n//4 positions away (not a near-identical neighbour)
            j = (i + int(rng.integers(max(1, n // 4), max(2, n - n // 4 + 1)))) % n if n > 1 else i
            partner = batch[j]
        res = _one(batch[i], family, p, rng, partner)
        out.append(torch.as_tensor(res).float().clamp(0.0, 1.0))
    return torch.stack(out).numpy()
