"""Score features for copy detection: fused pixel + embedding scores and flip-invariant matching.

Everything here returns an ordinary feature matrix (one row per image), so :func:`memscan.metrics.match`,
:func:`~memscan.metrics.topk_correlation` and :func:`~memscan.metrics.calibrate_threshold` consume it unchanged.

The construction: each block of features is standardised per row (zero mean, unit norm) and scaled by
``sqrt(w_b / sum(w))``. The concatenation then has zero mean and unit norm, so the Pearson correlation between two
fused rows equals the weighted mean of the blocks' Pearson correlations::

    r_fused(x, y) = sum_b w_b * r_b(x, y) / sum_b w_b

A flip-invariant block averages the standardised features of an image and of its mirror image, so an image and its
mirror copy get identical rows (Pearson 1) — test-time invariance without changing the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from memscan.errors import InputError

__all__ = ["standardize_rows", "fuse_features", "flip_invariant_features", "pixel_features"]


def standardize_rows(features: np.ndarray, source: str = "features") -> np.ndarray:
    """Centre each row and scale it to unit Euclidean norm (so a dot product is a Pearson correlation).

    Args:
        features: N×D array.
        source: name used in error messages.

    Returns:
        ``float32`` N×D array; rows with zero variance raise.

    Raises:
        InputError: not 2-D, non-finite values, or a constant row (its correlation is undefined).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(source, f"expected a 2-D array (rows = images), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(source, "contains NaN or infinite values", row=int(np.argwhere(~np.isfinite(x))[0, 0]))
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm <= 1e-12).any():
        raise InputError(source, "a row is constant: its correlation is undefined", row=int(np.argmin(norm)))
    return (x / norm).astype(np.float32)


def fuse_features(blocks: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Concatenate feature blocks so that Pearson correlation of the result is the weighted mean of theirs.

    Args:
        blocks: name → N×D_b array (same N for every block), e.g. ``{"pixel": ..., "embedding": ...}``.
        weights: name → non-negative weight (default 1 each); blocks with weight 0 are dropped.

    Returns:
        ``float32`` N×sum(D_b) array to pass to :func:`memscan.metrics.match` as embeddings.

    Raises:
        InputError: no block, a negative or all-zero weight, mismatched row counts, or a constant row.
    """
    if not blocks:
        raise InputError("blocks", "at least one feature block is needed")
    weights = {name: 1.0 for name in blocks} if weights is None else dict(weights)
    unknown = set(weights) - set(blocks)
    if unknown:
        raise InputError("weights", f"no feature block named {sorted(unknown)}; blocks are {sorted(blocks)}")
    if any(w < 0 for w in weights.values()):
        raise InputError("weights", f"must be non-negative, got {weights}")
    total = sum(weights.get(name, 0.0) for name in blocks)
    if total <= 0:
        raise InputError("weights", "at least one block needs a positive weight")
    rows = {name: len(b) for name, b in blocks.items()}
    if len(set(rows.values())) != 1:
        raise InputError("blocks", f"blocks have different numbers of rows: {rows}")
    parts = [standardize_rows(b, name) * np.float32(np.sqrt(weights.get(name, 0.0) / total))
             for name, b in blocks.items() if weights.get(name, 0.0) > 0]
    return np.concatenate(parts, axis=1)


def flip_invariant_features(images: np.ndarray, extract: Callable[[np.ndarray], np.ndarray],
                            axes: Sequence[int] = (-1,)) -> np.ndarray:
    """Features that are identical for an image and its mirror image along ``axes``.

    Computes ``standardize(extract(x)) + standardize(extract(flip(x)))`` for every subset of ``axes`` (the flip
    group), i.e. the group average of the standardised features.

    Args:
        images: ``[N, C, *spatial]`` array.
        extract: maps an image batch to N×D features (an encoder's embedding, or :func:`pixel_features`).
        axes: spatial axes (negative = counted from the end) to mirror; ``(-1,)`` is left-right.

    Returns:
        ``float32`` N×D array.
    """
    images = np.asarray(images)
    if images.ndim < 3:
        raise InputError("images", f"expected [N, C, *spatial], got shape {images.shape}")
    spatial = images.ndim - 2
    for a in axes:
        if not -spatial <= a < spatial or (0 <= a < 2):
            raise InputError("axes", f"flip axes must be spatial axes (-{spatial}..-1 or 2..), got {a}")
    flips: list[tuple[int, ...]] = [()]
    for a in axes:
        flips += [f + (a,) for f in flips]
    total = None
    for f in flips:
        view = np.flip(images, axis=f).copy() if f else images
        part = standardize_rows(np.asarray(extract(view)), "features")
        total = part if total is None else total + part
    return (total / len(flips)).astype(np.float32)


def pixel_features(images: np.ndarray, size: int | Sequence[int] | None = None) -> np.ndarray:
    """Flattened pixels, optionally area-downsampled to ``size`` first (a coarse scale ignores fine detail).

    Args:
        images: ``[N, C, *spatial]`` array.
        size: target spatial size (int for every axis) or None for full resolution.

    Returns:
        ``float32`` N×(C·prod(size)) array.
    """
    import torch
    from monai.transforms import Resize

    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 4:
        raise InputError("images", f"expected [N, C, *spatial], got shape {images.shape}")
    if size is not None:
        resize = Resize(spatial_size=size, mode="area")
        images = np.stack([np.asarray(resize(torch.as_tensor(im))) for im in images])
    return images.reshape(len(images), -1)
