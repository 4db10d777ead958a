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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from memscan.errors import InputError

__all__ = ["standardize_rows", "rank_rows", "fuse_features", "flip_invariant_features", "area_pixels",
           "pixel_features", "ALIGN_ANGLES", "ALIGN_SCALES", "ALIGN_WEIGHTS", "AlignedMatch", "align_and_correlate",
           "aligned_search", "shortlist_candidates", "shortlist_depth", "shortlist_arguments", "bandpass_candidates",
           "merge_candidates", "bend_candidates", "BEND_CHOICE", "deform_and_correlate", "LBFGS_HISTORY"]

logger = logging.getLogger(__name__)
#: seconds between two progress lines of a long :func:`align_and_correlate` (INFO; the CLI prints them)
PROGRESS_SECONDS = 30.0


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


#: rows :func:`rank_rows` sorts at once: bounds its working memory (a sort's order, its values and the run bounds,
#: each a float64 / int64 copy of the block) on large sets
RANK_CHUNK_ROWS = 1024


def rank_rows(features: np.ndarray) -> np.ndarray:
    """Each row's values replaced by their ranks 1..D within the row, ties given their average rank.

    The Pearson correlation of two ranked rows is their Spearman correlation, unchanged by any increasing intensity
    mapping of either image (gamma, windowing, contrast curves). Vectorised over blocks of :data:`RANK_CHUNK_ROWS`
    rows, so a large set ranks at the speed of a few sorts in bounded memory (numpy has no row-wise tie-averaged
    rank; ``scipy.stats.rankdata`` is not a dependency).

    Args:
        features: N×D array (1-D: one row).

    Returns:
        ``float64`` array of the input's shape.
    """
    x = np.asarray(features, dtype=np.float64)
    rows = np.atleast_2d(x)
    ranks = np.empty_like(rows)
    for start in range(0, len(rows), RANK_CHUNK_ROWS):
        block = rows[start:start + RANK_CHUNK_ROWS]
        n, d = block.shape
        order = np.argsort(block, axis=1, kind="stable")
        ordered = np.take_along_axis(block, order, axis=1)
        position = np.broadcast_to(np.arange(d), (n, d))
        differs = ordered[:, 1:] != ordered[:, :-1]  # a run of equal values ends where the next value differs
        first = np.maximum.accumulate(np.where(np.c_[np.ones((n, 1), bool), differs], position, 0), axis=1)
        last = np.minimum.accumulate(np.where(np.c_[differs, np.ones((n, 1), bool)], position, d - 1)[:, ::-1],
                                     axis=1)[:, ::-1]
        np.put_along_axis(ranks[start:start + RANK_CHUNK_ROWS], order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks.reshape(x.shape)


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


def area_pixels(images: Any, size: int | Sequence[int]) -> Any:
    """Area-downsampled, flattened pixels of a ``[N, C, *spatial]`` torch tensor (any device): N×(C·prod(size)).

    The whole batch at once; what MONAI's ``Resize(mode="area")`` computes image by image. Shared by
    :func:`pixel_features` and the embedding pass that computes the fused score's pixels
    (:class:`memscan.embed.MirroredFeatureInferer`).
    """
    import torch.nn.functional as F

    dims = images.ndim - 2
    target = [int(size)] * dims if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    return F.interpolate(images.float(), size=target, mode="area").flatten(1)


def pixel_features(images: np.ndarray, size: int | Sequence[int] | None = None) -> np.ndarray:
    """Flattened pixels, optionally area-downsampled to ``size`` first (a coarse scale ignores fine detail).

    Args:
        images: ``[N, C, *spatial]`` array.
        size: target spatial size (int for every axis) or None for full resolution.

    Returns:
        ``float32`` N×(C·prod(size)) array.
    """
    import torch

    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 4:
        raise InputError("images", f"expected [N, C, *spatial], got shape {images.shape}")
    if size is not None:
        return area_pixels(torch.from_numpy(np.ascontiguousarray(images)), size).numpy()
    return images.reshape(len(images), -1)


# ----------------------------------------------------------------------------------------------------------------
# test-time geometric alignment (retrieval + verification)
# ----------------------------------------------------------------------------------------------------------------
#: default rotation grid (degrees) of :func:`align_and_correlate`: ±12° in 3° steps
ALIGN_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(-12, 13, 3))
#: default zoom grid: 7 zooms evenly spaced in log scale from 0.8 to 1.25
ALIGN_SCALES: tuple[float, ...] = tuple(float(s) for s in np.round(np.geomspace(0.8, 1.25, 7), 4))
#: default weights of the aligned pixel correlation and the candidate's feature correlation (detection benchmark)
ALIGN_WEIGHTS: dict[str, float] = {"pixel": 1.0, "features": 1.0}


class AlignedMatch(NamedTuple):
    """Outcome of :func:`align_and_correlate` / :func:`aligned_search`.

    Attributes:
        score: ``[N]`` float64, each query's best fused score over its candidates (``-inf`` without a candidate).
        index: ``[N]`` int64, the reference index of that best candidate (``-1`` without a candidate).
        candidates: ``[N, K]`` int64, the candidates that were verified (``-1`` = none).
        pixel: ``[N, K]`` float64, each candidate's best Pearson correlation of coarse pixels over the transforms.
        fused: ``[N, K]`` float64, ``(w_pixel * pixel + w_features * feature_score) / (w_pixel + w_features)``.
    """

    score: np.ndarray
    index: np.ndarray
    candidates: np.ndarray
    pixel: np.ndarray
    fused: np.ndarray

    def ranked(self, first: int | None = None) -> np.ndarray:
        """``[N, K]`` the candidates by their fused score, best first (missing ones last; ties keep their order);
        with ``first``, only each row's first ``first`` candidates (``[N, first]``: e.g. the retrieval's own ones
        of a :func:`shortlist_candidates` list)."""
        fused, candidates = self.fused[:, :first], self.candidates[:, :first]
        order = np.argsort(-fused, axis=1, kind="stable")
        return np.take_along_axis(candidates, order, axis=1)


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (4, 5):
        raise InputError(source, f"expected [N, C, *spatial] with 2 or 3 spatial axes, got shape {x.shape}")
    if len(x) == 0:
        raise InputError(source, "no images")
    if not np.isfinite(x).all():
        raise InputError(source, "contains NaN or infinite values",
                         row=int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0]))
    return x


def _check_pairs(query_images: np.ndarray, reference_images: np.ndarray, candidates: np.ndarray):
    """Checked query and reference images (same channels and spatial shape) and ``[N, K]`` int64 candidate indices
    into the references (``-1`` = none; a 1-D array is one candidate per query)."""
    q_img = _check_images(query_images, "query_images")
    r_img = _check_images(reference_images, "reference_images")
    if q_img.shape[1:] != r_img.shape[1:]:
        raise InputError("reference_images", f"shape {r_img.shape[1:]} differs from the queries' {q_img.shape[1:]}")
    n, m = len(q_img), len(r_img)
    cand = np.asarray(candidates)
    if cand.ndim == 1:
        cand = cand[:, None]
    if cand.ndim != 2 or len(cand) != n or cand.shape[1] == 0 or not np.issubdtype(cand.dtype, np.integer):
        raise InputError("candidates", f"expected an integer [{n}, K] array, got {cand.dtype} {cand.shape}")
    if ((cand < -1) | (cand >= m)).any():
        raise InputError("candidates", f"indices must be in [0, {m}) or -1",
                         row=int(np.argwhere((cand < -1) | (cand >= m))[0, 0]))
    return q_img, r_img, cand.astype(np.int64)


def _spatial_axis(a: Any, dims: int, what: str) -> int:
    """A spatial axis (negative = from the end) as its index in ``0..dims - 1``; ``what`` names it in the error."""
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -dims <= a < dims:
        raise InputError(what, f"spatial axes are -{dims}..{dims - 1} (negative = from the end), got {a!r}")
    return int(a) % dims


def _plane_axes(plane: Sequence[int], dims: int) -> tuple[int, ...]:
    """The two different spatial axes of ``plane`` as indices in ``0..dims - 1``."""
    pl = tuple(_spatial_axis(a, dims, "plane") for a in plane)
    if len(pl) != 2 or pl[0] == pl[1]:
        raise InputError("plane", f"expected two different spatial axes, got {plane}")
    return pl


def _at_size(q_img: np.ndarray, r_img: np.ndarray, size: int | Sequence[int] | None):
    """Query and reference images as torch tensors, area-downsampled to ``size`` (int for every axis; None keeps
    them as they are)."""
    import torch
    import torch.nn.functional as F

    q_t, r_t = torch.from_numpy(q_img), torch.from_numpy(r_img)
    if size is None:
        return q_t, r_t
    dims = q_img.ndim - 2
    target = [int(size)] * dims if np.isscalar(size) else [int(s) for s in size]
    if len(target) != dims or min(target) < 2:
        raise InputError("size", f"expected {dims} sizes ≥ 2, got {size}")
    return F.interpolate(q_t, size=target, mode="area"), F.interpolate(r_t, size=target, mode="area")


def _warp_matrices(spatial: Sequence[int], plane: tuple[int, int], angles: Any, scales: Any, mirrors: Any):
    """``affine_grid`` matrices (output → input, normalised coordinates in x, y[, z] order) of W warps, each a mirror
    (``mirrors`` [W, dims] of ±1), then a rotation by ``angles`` [W] degrees and a zoom by ``scales`` [W] in ``plane``;
    the zoom maps a reference pixel ``u`` to ``s·u`` (``s > 1`` enlarges the content). torch tensors → [W, dims,
    dims + 1] float32."""
    import torch

    dims = len(spatial)
    half = torch.tensor([n / 2.0 for n in spatial], dtype=torch.float64)
    rad = torch.deg2rad(torch.as_tensor(angles, dtype=torch.float64))
    z = torch.as_tensor(scales, dtype=torch.float64)
    m = torch.eye(dims, dtype=torch.float64).repeat(len(rad), 1, 1)  # pixel units, tensor-axis order
    p, q = plane
    c, s_ = torch.cos(rad) / z, torch.sin(rad) / z
    m[:, p, p], m[:, p, q], m[:, q, p], m[:, q, q] = c, -s_, s_, c
    m = m * torch.as_tensor(mirrors, dtype=torch.float64)[:, None, :]  # mirror the output coordinate, then rotate
    m = m * (half[None, :] / half[:, None])[None]  # normalised coordinates: D⁻¹ M D with D = diag(n / 2)
    m = torch.flip(m, dims=(1, 2))  # affine_grid wants (x = last axis, y, z) order
    return torch.cat([m, torch.zeros(len(m), dims, 1, dtype=torch.float64)], dim=2).float()


def _similarity_grid(dims: int, angles: Sequence[float], scales: Sequence[float], flip_axes: Sequence[int]):
    """Every flip × rotation × zoom of the search, in that nesting order: (angles [T], scales [T], mirrors [T, dims])
    as float64 torch tensors."""
    import torch

    flips: list[tuple[int, ...]] = [()]
    for a in flip_axes:
        flips += [f + (a,) for f in flips]
    mirrors = torch.ones(len(flips), dims, dtype=torch.float64)
    for i, f in enumerate(flips):
        mirrors[i, list(f)] = -1.0
    n_a, n_s = len(angles), len(scales)
    return (torch.tensor(angles, dtype=torch.float64).repeat_interleave(n_s).repeat(len(flips)),
            torch.tensor(scales, dtype=torch.float64).repeat(n_a * len(flips)),
            mirrors.repeat_interleave(n_a * n_s, dim=0))


def _standardize_images(x, shares: Sequence[float] = (1.0,)):
    """torch ``[B, C, *spatial]`` → zero mean, unit norm per image (float32), and the norms before.

    With several ``shares`` (summing to 1) the channels form that many equal groups, each standardised on its own and
    scaled by √share, so the dot product of two such images is the share-weighted mean of the groups' Pearson
    correlations; the norms returned are the first group's.
    """
    import torch

    groups = x.reshape(len(x), len(shares), -1)
    groups = groups - groups.mean(dim=2, keepdim=True)
    norm = groups.norm(dim=2, keepdim=True)
    scale = torch.tensor([float(sh) ** 0.5 for sh in shares], dtype=x.dtype, device=x.device).reshape(1, -1, 1)
    return (groups / norm.clamp_min(1e-12) * scale).reshape(x.shape), norm[:, 0, 0]


def _highpass(x, sigma: float, plane: tuple[int, int]):
    """torch ``[B, C, *spatial]`` minus its Gaussian blur (σ in pixels, sampled kernel to 3σ, edges replicated) along
    the two ``plane`` axes."""
    import torch
    from monai.networks.layers import gaussian_1d

    kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, approx="sampled", normalize=True).to(x)
    radius = len(kernel) // 2
    x = x - x.mean(dim=[2 + a for a in plane], keepdim=True)  # a constant image high-passes to exactly 0
    blurred = x
    # hand-written: MONAI's separable_filtering (one-channel convolutions) is ~10× slower on a CPU, forward and
    # backward, than this product with the same filter as a matrix (edges replicated), which the non-rigid fit runs
    # at every step
    for axis in plane:
        n = x.shape[2 + axis]
        taps = torch.arange(n, device=x.device)[:, None] + torch.arange(len(kernel), device=x.device) - radius
        matrix = torch.zeros(n, n, dtype=x.dtype, device=x.device).scatter_add_(
            1, taps.clamp(0, n - 1), kernel.expand(n, -1).contiguous())
        blurred = (blurred.movedim(2 + axis, -1) @ matrix.T).movedim(-1, 2 + axis)
    return x - blurred


def _subpixel_gain(corr, pos, spatial: Sequence[int]):
    """Sub-pixel refinement of correlation peaks: per axis, the vertex of the parabola through the peak and its two
    circular neighbours (offset clamped to ±½ pixel), summed over axes. ``corr`` [P, T, prod(spatial)], ``pos``
    [P, T] flat peak indices → ([P, T] gains ≥ 0, [P, T, dims] the vertices' offsets from the peak in pixels)."""
    import torch

    coords = list(np.unravel_index(np.arange(int(np.prod(spatial))), spatial))
    coords_t = [torch.from_numpy(c.astype(np.int64)).to(pos.device)[pos] for c in coords]
    strides = [int(np.prod(spatial[d + 1:])) for d in range(len(spatial))]
    centre = torch.gather(corr, 2, pos[..., None])[..., 0]
    gain = torch.zeros_like(centre)
    offsets = torch.zeros(*centre.shape, len(spatial), dtype=corr.dtype, device=corr.device)
    for d, n in enumerate(spatial):
        if n < 3:
            continue
        vals = []
        for step in (-1, 1):
            moved = pos + ((coords_t[d] + step) % n - coords_t[d]) * strides[d]
            vals.append(torch.gather(corr, 2, moved[..., None])[..., 0])
        left, right = vals
        curv = left - 2 * centre + right
        delta = torch.where(curv < 0, ((left - right) / (2 * curv.clamp(max=-1e-12))).clamp(-0.5, 0.5),
                            torch.zeros_like(curv))
        part = delta * (right - left) / 2 + delta ** 2 * curv / 2
        gain = gain + part.clamp_min(0.0)
        offsets[..., d] = torch.where(part > 0, delta, torch.zeros_like(delta))
    return gain, offsets


def _correlate_warped(q_std, warped, shares: Sequence[float] = (1.0,)):
    """Pearson correlation of each standardised query ``q_std`` [P, C, *spatial] with its warped reference
    [P, C, *spatial] → [P]; ``-inf`` where the warp left no contrast (the correlation is undefined)."""
    w_std, w_norm = _standardize_images(warped, shares)
    return (q_std * w_std).flatten(1).sum(1).masked_fill(~(w_norm > 1e-6), float("-inf"))


def _best_candidates(cand: np.ndarray, pixel: np.ndarray, fused: np.ndarray) -> AlignedMatch:
    """Each query's best candidate by ``fused`` (``-inf`` for missing candidates) as an :class:`AlignedMatch`."""
    rows = np.arange(len(cand))
    best_k = np.argmax(fused, axis=1)
    score = fused[rows, best_k]
    index = np.where(np.isfinite(score), cand[rows, best_k], -1)
    return AlignedMatch(score=score, index=index, candidates=cand, pixel=pixel, fused=fused)


def align_and_correlate(query_images: np.ndarray, reference_images: np.ndarray, candidates: np.ndarray, *,
                        feature_scores: np.ndarray | None = None, weights: Mapping[str, float] | None = None,
                        angles: Sequence[float] = ALIGN_ANGLES, scales: Sequence[float] = ALIGN_SCALES,
                        max_shift: float | Sequence[float] = 0.15, flip_axes: Sequence[int] = (-1,),
                        plane: tuple[int, int] = (-2, -1), size: int | Sequence[int] | None = None,
                        subpixel: bool = True, refine_rounds: int = 0, rewarp: bool = True,
                        highpass: float | None = None, highpass_weight: float = 1.0,
                        device: Any = "auto", budget: int | None = None) -> AlignedMatch:
    """Verify retrieval candidates by aligning each one to its query and correlating the aligned pixels.

    For every (query, candidate) pair the candidate is warped by every transform of a small similarity group —
    mirror along ``flip_axes`` × rotation by ``angles`` in ``plane`` × zoom by ``scales`` — and, for each warp, the
    Pearson correlation with the query is computed for every translation up to ``max_shift`` at once by FFT
    cross-correlation (circular shifts, which keep each image's mean and norm, so every value is an exact Pearson
    correlation of the query with a shifted copy). The pair's pixel score is the best value; it is fused with the
    pair's ``feature_scores`` (e.g. the embedding correlation) by ``weights`` and each query keeps its best candidate.
    Images are area-downsampled to ``size`` first (a coarse scale ignores detail an alignment cannot recover). 2D
    and 3D share one path (``torch.nn.functional.affine_grid`` / ``grid_sample``); in 3D the rotation and zoom act in
    ``plane`` only (rotation about the remaining axis), translation on every axis.

    Apply the same function to the calibration pairs (each training image against its validation candidates) so
    that τ is the null of the same search: the search raises unrelated pairs' correlations too.

    Args:
        query_images: ``[N, C, *spatial]`` (2 or 3 spatial axes).
        reference_images: ``[M, C, *spatial]``, same C and spatial shape.
        candidates: ``[N, K]`` reference indices per query (``-1`` = no candidate), e.g. the indices of
            :func:`memscan.metrics.topk_correlation` on the ordinary features.
        feature_scores: optional ``[N, K]`` correlations of the same pairs in another feature space (the embedding).
        weights: ``{"pixel": w_p, "features": w_f}`` (default :data:`ALIGN_WEIGHTS`; ignored without
            ``feature_scores``).
        angles: rotation angles in degrees (include 0).
        scales: zoom factors of the reference (include 1).
        max_shift: largest translation searched, as a fraction of each axis (one value or one per spatial axis).
        flip_axes: spatial axes (negative = from the end) along which the mirrored reference is tried too.
        plane: the two spatial axes (negative = from the end) of rotation and zoom.
        size: spatial size of the comparison (int for every axis) or None for the input size.
        subpixel: refine each correlation peak to sub-pixel translation (parabola through the peak and its
            neighbours, per axis); without it an integer-pixel shift on a coarse grid loses a few percent.
        refine_rounds: coarse-to-fine search of rotation and zoom: after the grid, each pair's best warp is tried
            again at its 8 neighbours half a grid step away in angle and in log-zoom (same mirror, all shifts again),
            the best kept, and the step halved for the next round. A copy zoomed between two grid values lines up
            again (the grid's 7.7% zoom steps leave up to 3.8%, most of a pixel at the edge of a 64² image). The
            rounds stay within the grid's range, so two rounds search a subset of a grid four times finer per axis;
            each round costs 8 warps per pair against the grid's one set of warps per reference.
        rewarp: warp each pair's plain reference once more by its best rotation, zoom and shift together
            (sub-pixel, not circular), high-pass it after that warp as the query was, and keep the larger of that
            direct correlation and the search's. The search's shifts are circular, so a copy zoomed into an image's
            corner lost the strip the zoom about the centre cut off (strong crops of the detection benchmark: 0.82
            instead of 0.99), and a copy rotated within its frame has the frame's edges in its high-pass, which a
            reference high-passed before its warp lacks. One more warp per pair.
        highpass: σ in pixels (at ``size``) of a Gaussian blur in ``plane`` subtracted from every image before the
            search, or None: only detail finer than the outline all subjects share is then correlated, so a new
            patient's image no longer lines up with a training image by its head or chest silhouette.
        highpass_weight: with ``highpass``, the share of the high-passed image in the pixel score: the score is
            ``(1 - w) · r(plain) + w · r(high-passed)`` at the same warp and shift (one search over both, stacked as
            channels); 1 = the high-passed image alone. A share of plain pixels keeps some of the coarse shape, for
            images with little fine detail.
        device: where the search runs (``"auto"``: CUDA when available; see :func:`memscan.metrics.resolve_device`).
            The images stay on the CPU (downsampled and high-passed there); each step moves its queries' transforms
            and its references to the device.
        budget: complex values held per step of (query, candidate) pairs (memory ≈ 8 bytes × budget × a few);
            default 2²² on a CPU, 2²⁶ on a GPU.

    Returns:
        :class:`AlignedMatch`.

    Raises:
        InputError: malformed images, candidates, scores, grids or axes.
    """
    # hand-written: MONAI and torch register images by optimisation (one pair at a time), not a batched exhaustive
    # similarity-transform search
    import torch
    import torch.nn.functional as F

    from memscan.metrics import resolve_device

    dev = resolve_device(device)
    if budget is None:
        budget = 1 << (26 if dev.type == "cuda" else 22)
    q_img, r_img, cand = _check_pairs(query_images, reference_images, candidates)
    n, dims = len(q_img), q_img.ndim - 2
    k = cand.shape[1]
    if feature_scores is not None:
        fs = np.asarray(feature_scores, dtype=np.float64)
        if fs.shape != cand.shape:
            raise InputError("feature_scores", f"expected shape {cand.shape}, got {fs.shape}")
        if np.isnan(fs[cand >= 0]).any():
            raise InputError("feature_scores", "NaN for a candidate",
                             row=int(np.argwhere(np.isnan(fs) & (cand >= 0))[0, 0]))
        w = dict(ALIGN_WEIGHTS if weights is None else weights)
        if set(w) != {"pixel", "features"} or any(not np.isfinite(v) or v < 0 for v in w.values()) or \
                sum(w.values()) <= 0:
            raise InputError("weights", f"expected non-negative {{'pixel', 'features'}} with a positive sum, got {w}")
    angles = [float(a) for a in angles]
    scales = [float(s) for s in scales]
    if not angles or not scales or not np.isfinite(angles).all() or not all(np.isfinite(s) and s > 0 for s in scales):
        raise InputError("scales", f"need finite angles and positive zooms, got angles {angles}, scales {scales}")

    pl = _plane_axes(plane, dims)
    flips = sorted({_spatial_axis(a, dims, "flip_axes") for a in flip_axes})
    if isinstance(refine_rounds, bool) or not isinstance(refine_rounds, (int, np.integer)) or refine_rounds < 0:
        raise InputError("refine_rounds", f"expected a non-negative integer, got {refine_rounds!r}")
    if not isinstance(rewarp, (bool, np.bool_)):
        raise InputError("rewarp", f"expected True or False, got {rewarp!r}")
    shifts = [float(max_shift)] * dims if np.isscalar(max_shift) else [float(s) for s in max_shift]
    if len(shifts) != dims or any(not 0 <= s < 0.5 for s in shifts):
        raise InputError("max_shift", f"expected {dims} fraction(s) in [0, 0.5), got {max_shift}")

    q_t, r_t = _at_size(q_img, r_img, size)
    spatial = list(q_t.shape[2:])
    shares: tuple[float, ...] = (1.0,)
    if highpass is not None:
        if isinstance(highpass, bool) or not isinstance(highpass, (int, float)) or not 0 < highpass < max(spatial):
            raise InputError("highpass", f"expected a blur σ in (0, {max(spatial)}) pixels, got {highpass!r}")
        w_hp = highpass_weight
        if isinstance(w_hp, bool) or not isinstance(w_hp, (int, float)) or not 0 < w_hp <= 1:
            raise InputError("highpass_weight", f"expected a share in (0, 1], got {w_hp!r}")
        if w_hp < 1:  # plain channels first (their norm guards against blank images), then the high-passed ones
            shares = (1.0 - float(w_hp), float(w_hp))

    def compared(x):
        """Images as compared: high-passed, or plain and high-passed stacked as channels (``shares``)."""
        if highpass is None:
            return x
        hp = _highpass(x, float(highpass), pl)
        return hp if len(shares) == 1 else torch.cat([x, hp], dim=1)

    r_plain = r_t  # re-warped before high-passing, as the query was (a rotated copy's high-pass has its corners)
    q_t, r_t = compared(q_t), compared(r_t)
    q_std, q_norm = _standardize_images(q_t, shares)
    if (q_norm <= 1e-12).any():
        what = "has no detail finer than the high-pass blur" if highpass is not None and shares == (1.0,) \
            else "is constant"
        raise InputError("query_images", f"an image {what}: its correlation is undefined",
                         row=int(torch.argmin(q_norm)))
    grid_angle, grid_zoom, grid_mirror = _similarity_grid(dims, angles, scales, flips)
    theta = _warp_matrices(spatial, pl, grid_angle, grid_zoom, grid_mirror)  # [T, dims, dims + 1]
    n_t = len(theta)
    # the refinement's first steps: half the grid's finest spacing in angle and in log-zoom (0: one value, kept)
    steps = [float(np.diff(np.unique(v)).min()) if len(np.unique(v)) > 1 else 0.0 for v in (angles, np.log(scales))]
    moves = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)
                          if (i, j) != (0, 0) and (steps[0] or not i) and (steps[1] or not j)], dtype=torch.float64)
    s_dims = tuple(range(-dims, 0))
    q_f = torch.fft.rfftn(q_std, dim=s_dims)  # [N, C, *freq]
    # flat indices of the allowed circular shifts (0..w and n-w..n-1 on each axis)
    win = [int(np.floor(f * s)) for f, s in zip(shifts, spatial)]
    keep = np.zeros(spatial, dtype=bool)
    keep[np.ix_(*[sorted({i % s for i in range(-w, w + 1)}) for w, s in zip(win, spatial)])] = True
    allowed = torch.from_numpy(np.flatnonzero(keep)).to(dev)

    # the sampling grid of each warp depends only on the warp: built once, repeated for every reference of a step
    # (affine_grid per chunk was half the search's time on a CPU)
    base_grid = F.affine_grid(theta.to(dev), [n_t, q_t.shape[1], *spatial], align_corners=False)  # [T, *sp., dims]

    strides = torch.tensor([int(np.prod(spatial[d + 1:])) for d in range(dims)], device=dev)
    sizes = torch.tensor(spatial, device=dev)

    def peak_over_shifts(corr):
        """[P, W, prod(spatial)] circular correlations → [P, W] best over the allowed shifts (sub-pixel refined) and
        [P, W, dims] those shifts in pixels (signed, per tensor axis)."""
        pos = allowed[corr[:, :, allowed].argmax(dim=2)]
        peak = torch.gather(corr, 2, pos[..., None])[..., 0]
        coord = (pos[..., None] // strides) % sizes
        shift = torch.where(coord > sizes // 2, coord - sizes, coord).to(corr.dtype)
        if not subpixel:
            return peak, shift
        gain, offset = _subpixel_gain(corr, pos, spatial)
        return peak + gain, shift + offset

    def pick(values, at):
        """Entries ``at`` [P] of per-warp ``values`` [P, W, ...]."""
        return values[torch.arange(len(at), device=values.device), at.to(values.device)]

    def refine(best, at, shift, refs, q_sel):
        """Coarse-to-fine rotation / zoom around each pair's best grid warp ``at`` (see ``refine_rounds``) → the
        best values, rotations, log-zooms and shifts."""
        angle, log_zoom, mirror = grid_angle[at], torch.log(grid_zoom[at]), grid_mirror[at]
        n_p, n_m = len(at), len(moves)
        delta = list(steps)
        for _ in range(refine_rounds if len(moves) else 0):
            delta = [v / 2 for v in delta]
            # within the grid's range: the rounds subdivide the grid, they do not widen the search
            cand_angle = (angle[:, None] + moves[None, :, 0] * delta[0]).clamp(min(angles), max(angles))  # [P, M]
            cand_log = (log_zoom[:, None] + moves[None, :, 1] * delta[1]).clamp(float(np.log(min(scales))),
                                                                                float(np.log(max(scales))))
            th = _warp_matrices(spatial, pl, cand_angle.reshape(-1), torch.exp(cand_log).reshape(-1),
                                mirror.repeat_interleave(n_m, dim=0)).to(dev)
            warped = F.grid_sample(refs.repeat_interleave(n_m, dim=0),
                                   F.affine_grid(th, [n_p * n_m, refs.shape[1], *spatial], align_corners=False),
                                   mode="bilinear", padding_mode="zeros", align_corners=False)
            w_std, w_norm = _standardize_images(warped, shares)
            r_f = torch.fft.rfftn(w_std, dim=s_dims).reshape(n_p, n_m, *w_std.shape[1:2], *q_f.shape[2:])
            corr = torch.fft.irfftn((q_sel[:, None] * torch.conj(r_f)).sum(dim=2), s=spatial,
                                    dim=s_dims).reshape(n_p, n_m, -1)
            value, moved = peak_over_shifts(corr)
            value, j = value.masked_fill(~(w_norm.reshape(n_p, n_m) > 1e-6), float("-inf")).max(1)
            better = value > best
            best = torch.where(better, value, best)
            shift = torch.where(better[:, None], pick(moved, j), shift)
            better, j = better.cpu(), j.cpu()[:, None]
            angle = torch.where(better, cand_angle.gather(1, j)[:, 0], angle)
            log_zoom = torch.where(better, cand_log.gather(1, j)[:, 0], log_zoom)
        return best, angle, log_zoom, shift

    def rewarped(refs, q_sel, angle, log_zoom, mirror, shift):
        """Each pair's plain reference warped once more by its best rotation, zoom and (sub-pixel) shift together,
        then high-passed, and correlated with its query directly → [P]: the FFT's shifts are circular, so the part of
        a reference that its zoom moved out of view could not come back with the shift (a zoomed copy of an image's
        corner lost it); and a copy rotated or shifted within its frame has the edges of that frame in its high-pass,
        which only a reference warped before the high-pass shares."""
        th = _warp_matrices(spatial, pl, angle, torch.exp(log_zoom), mirror).to(dev)
        # output x samples the warped reference at x − shift: the translation −A·shift in normalised coordinates
        moved = (2.0 * shift / sizes).flip(-1).to(th.dtype)  # affine_grid's (x, y[, z]) order
        th[:, :, dims] = -(th[:, :, :dims] @ moved[..., None])[..., 0]
        warped = F.grid_sample(refs, F.affine_grid(th, list(refs.shape), align_corners=False), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        return _correlate_warped(q_sel, compared(warped), shares)

    pixel = np.full((n, k), -np.inf)
    # pairs sorted by reference, so each step warps and transforms a reference once for all its queries there
    # (warping is half the search's time; per query chunk, every pair re-warped its reference)
    rows, cols = np.nonzero(cand >= 0)
    pair_ref = cand[rows, cols]
    order = np.argsort(pair_ref, kind="stable")
    rows, cols, pair_ref = rows[order], cols[order], pair_ref[order]
    # pairs per step (and at most as many references)
    step = max(1, int(budget) // max(1, n_t * int(np.prod(spatial)) * q_t.shape[1]))
    started = last_said = time.monotonic()
    with torch.no_grad():
        for start in range(0, len(rows), step):
            now = time.monotonic()
            if start and now - last_said >= PROGRESS_SECONDS:  # a long search says how far it is (large sets: minutes)
                left = (now - started) / start * (len(rows) - start)
                logger.info("aligning: %d of %d candidate pairs (%.0f%%), about %.0f min left", start, len(rows),
                            100.0 * start / len(rows), left / 60.0)
                last_said = now
            p_rows, p_cols = rows[start:start + step], cols[start:start + step]
            used, inverse = np.unique(pair_ref[start:start + step], return_inverse=True)
            refs = r_t[torch.from_numpy(used)].to(dev)  # [U, C, *spatial]
            u = len(used)
            grid = base_grid.repeat(u, *([1] * (base_grid.ndim - 1)))
            warped = F.grid_sample(refs.repeat_interleave(n_t, dim=0), grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)  # [U·T, C, *spatial]
            w_std, w_norm = _standardize_images(warped, shares)
            r_f = torch.fft.rfftn(w_std, dim=s_dims).reshape(u, n_t, *w_std.shape[1:2], *q_f.shape[2:])
            inv = torch.from_numpy(inverse.reshape(-1)).to(dev)
            q_sel = q_f[torch.from_numpy(p_rows)].to(dev)
            prod = q_sel[:, None] * torch.conj(r_f[inv])
            corr = torch.fft.irfftn(prod.sum(dim=2), s=spatial, dim=s_dims).reshape(len(p_rows), n_t, -1)
            peak, peak_shift = peak_over_shifts(corr)
            # a warp that left no contrast (zoomed into a blank region) has no defined correlation
            ok = (w_norm.reshape(u, n_t) > 1e-6)[inv]
            best, at = peak.masked_fill(~ok, float("-inf")).max(dim=1)
            at = at.cpu()
            best, angle, log_zoom, shift = refine(best, at, pick(peak_shift, at), refs[inv], q_sel)
            if rewarp:
                plain_refs = r_plain[torch.from_numpy(used)].to(dev)[inv]
                direct = rewarped(plain_refs, q_std[torch.from_numpy(p_rows)].to(dev), angle, log_zoom,
                                  grid_mirror[at], shift)
                best = torch.maximum(best, direct)
            pixel[p_rows, p_cols] = best.double().cpu().numpy()
    pixel = np.clip(pixel, -1.0, 1.0)
    if feature_scores is None:
        fused = pixel.copy()
    else:
        fused = (w["pixel"] * pixel + w["features"] * fs) / (w["pixel"] + w["features"])
    fused[cand < 0] = -np.inf
    return _best_candidates(cand, pixel, fused)


def aligned_search(query_images: np.ndarray, reference_images: np.ndarray, query_features: np.ndarray,
                   reference_features: np.ndarray, *, k: int = 5, query_scoring: np.ndarray | None = None,
                   reference_scoring: np.ndarray | None = None, query_groups: Sequence | None = None,
                   reference_groups: Sequence | None = None, shortlist: Mapping[str, Any] | None = None,
                   device: str = "auto", **align: Any) -> AlignedMatch:
    """Retrieval + geometric verification: top-``k`` references by feature correlation, then
    :func:`align_and_correlate` on those pairs.

    Args:
        query_images, reference_images: ``[N, C, *spatial]`` / ``[M, C, *spatial]`` images (preprocessed).
        query_features, reference_features: the retrieval features (e.g. :func:`flip_invariant_features` of fused
            pixels + embedding), compared by :func:`memscan.metrics.topk_correlation`.
        k: candidates verified per query.
        query_scoring, reference_scoring: features whose correlation is fused with the aligned pixels (e.g. the
            embedding); default the retrieval features.
        query_groups, reference_groups: subject ids; same-subject pairs are never candidates.
        shortlist: optional ``{"depth": D, "extra": E, "factor": f, "highpass": σ}``: retrieve the top ``D``
            instead and verify the first ``k`` of them plus the ``E`` of the rest that a quick alignment at the
            alignment's size ÷ ``f`` (high-passed by σ px there) scores highest (:func:`shortlist_candidates`).
        device: for the retrieval and the alignment.
        **align: keyword arguments of :func:`align_and_correlate` (grids, ``size``, ``weights``, ...).

    Returns:
        :class:`AlignedMatch` (with ``shortlist``, its ``candidates`` are the retrieval's first ``k``, then the
        added ones).
    """
    from memscan.metrics import topk_correlation

    _, idx = topk_correlation(query_features, reference_features, shortlist_depth(k, shortlist),
                              query_groups=query_groups, reference_groups=reference_groups, device=device)
    if shortlist is not None:
        idx = shortlist_candidates(query_images, reference_images, idx, keep=k,
                                   **shortlist_arguments(shortlist, query_images, align), device=device)
    qs = standardize_rows(query_features if query_scoring is None else query_scoring, "query_scoring")
    rs = standardize_rows(reference_features if reference_scoring is None else reference_scoring,
                          "reference_scoring")
    if qs.shape[1] != rs.shape[1] or len(qs) != len(np.asarray(query_images)) or \
            len(rs) != len(np.asarray(reference_images)):
        raise InputError("reference_scoring", f"scoring features {qs.shape} / {rs.shape} do not match the images")
    feat = np.einsum("nd,nkd->nk", qs.astype(np.float64), rs[np.maximum(idx, 0)].astype(np.float64))
    feat[idx < 0] = -np.inf
    return align_and_correlate(query_images, reference_images, idx, feature_scores=feat, device=device, **align)


def shortlist_candidates(query_images: np.ndarray, reference_images: np.ndarray, candidates: np.ndarray, *,
                         keep: int, extra: int, size: int | Sequence[int] | None = None, highpass: float | None = None,
                         scales: Sequence[float] = ALIGN_SCALES, angles: Sequence[float] = (0.0,),
                         flip_axes: Sequence[int] = (), plane: tuple[int, int] = (-2, -1), device: Any = "auto",
                         budget: int | None = None) -> np.ndarray:
    """Narrow a deep retrieval list to the candidates worth a full alignment: each row's first ``keep`` as retrieved,
    and the ``extra`` of the rest that a quick alignment scores highest.

    Retrieval features tolerate only so much zoom and shift: a copy a generator cropped and enlarged by a quarter can
    sit 10-20 places down its source's retrieval list, behind other slices its enlarged outline resembles, while
    aligning it to the source gives r 0.99. The quick alignment looks that far down at a small fraction of the full
    alignment's cost per pair: by default it searches zoom × FFT translation only (and its re-warp, no coarse-to-fine
    rounds), as memscan's retrieval features are already mirror-invariant and trained on rotations; on the detection
    benchmark's MRI slices it adds the same sources as the full grid of mirror × rotation × zoom, 13-16× faster. The
    features' own first ``keep`` stay, so nothing the retrieval found is dropped.

    Args:
        query_images: ``[N, C, *spatial]``.
        reference_images: ``[M, C, *spatial]``.
        candidates: ``[N, K]`` reference indices per query, best first (``-1`` = none).
        keep: leading candidates kept as they are.
        extra: candidates added from the rest (``candidates[:, keep:]``) by their quick-alignment score.
        size: spatial size of the quick alignment (None: the input's).
        highpass: σ in pixels (at ``size``) of the blur subtracted before it, or None (see
            :func:`align_and_correlate`).
        scales, angles, flip_axes: its grid of zooms, rotations and mirrors (default: :data:`ALIGN_SCALES`, no
            rotation, no mirror).
        plane, device, budget: as in :func:`align_and_correlate`.

    Returns:
        ``[N, min(K, keep + extra)]`` int64 reference indices (``-1`` = none): the kept ones, then the added ones,
        best first.

    Raises:
        InputError: malformed images or candidates, or ``keep`` / ``extra`` not a non-negative integer.
    """
    for name, value in (("keep", keep), ("extra", extra)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(name, f"must be a non-negative integer, got {value!r}")
    cand = np.asarray(candidates)
    if cand.ndim != 2:
        raise InputError("candidates", f"must be [N, K] reference indices, got shape {cand.shape}")
    cand = cand.astype(np.int64)
    rest = cand[:, keep:]
    if extra == 0 or rest.shape[1] == 0:
        return cand[:, :keep].copy()
    if rest.shape[1] > extra:
        quick = align_and_correlate(query_images, reference_images, rest, size=size, highpass=highpass,
                                    weights={"pixel": 1.0, "features": 0.0}, scales=scales, angles=angles,
                                    flip_axes=flip_axes, plane=plane, device=device, budget=budget)
        rest = quick.ranked()
    return np.concatenate([cand[:, :keep], rest[:, :extra]], axis=1)


def shortlist_depth(keep: int, shortlist: Mapping[str, Any] | None) -> int:
    """Candidates per query a retrieval hands on: ``keep``, or a ``shortlist`` setting's ``depth`` where deeper."""
    return int(keep) if not shortlist else max(int(keep), int(shortlist["depth"]))


def shortlist_arguments(shortlist: Mapping[str, Any], images: np.ndarray, align: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`shortlist_candidates` keyword arguments (``extra``, ``size``, ``highpass``, ``plane``) of a ``shortlist``
    setting (``extra``; ``factor``: the alignment's size ÷ factor per axis; ``highpass``: σ px there) for the alignment
    arguments ``align`` (its ``size``, else the images' own, and its plane)."""
    spatial = np.asarray(images).shape[2:]
    size = align.get("size") or spatial
    size = [size] * len(spatial) if isinstance(size, (int, np.integer)) else list(size)
    factor = float(shortlist.get("factor", 2))
    return {"extra": int(shortlist["extra"]), "size": [max(4, int(round(n / factor))) for n in size],
            "highpass": shortlist.get("highpass"), "plane": align.get("plane", (-2, -1))}


def bandpass_candidates(query_images: np.ndarray, reference_images: np.ndarray, candidates: np.ndarray, k: int, *,
                        band: Sequence[float] = (2.0, 8.0), plane: tuple[int, int] = (-2, -1), device: Any = "auto",
                        chunk: int = 64) -> np.ndarray:
    """Each query's ``candidates`` re-ranked by their pixel correlation in one band of spatial frequencies: the first
    ``k``.

    The band is each image blurred by the smaller σ minus the same image blurred by the larger (in pixels, along the
    two ``plane`` axes): what a smooth local stretch moves but does not erase. A copy a generator reproduced with a
    strong elastic warp can lose its source from the top of a rigid alignment's list, behind neighbouring slices that
    line up better as a whole, while this band still puts the source among the retrieval's candidates' first five
    (the detection benchmark's CT: every weak and strong elastic copy, against 0.87-0.88 of the strong ones for the
    rigid alignment's list; docs/benchmarks/detection_candidates.md section 26). Only the given candidates are ranked,
    so a retrieval's exclusions (same subject, the other half of a split) hold.

    Args:
        query_images: ``[N, C, *spatial]``.
        reference_images: ``[M, C, *spatial]``, the same spatial size.
        candidates: ``[N, K]`` reference indices per query (``-1`` = none).
        k: candidates kept per query.
        band: (σ_fine, σ_coarse) in pixels, σ_fine < σ_coarse.
        plane: the two spatial axes the blur runs along.
        device: where the band-pass and the correlations run (``"auto"``, ``"cpu"``, ``"cuda"``...).
        chunk: queries at a time (each with its K candidates).

    Returns:
        ``[N, min(k, K)]`` int64 reference indices, most correlated first; ``-1`` (last) where a row has fewer.

    Raises:
        InputError: malformed images or candidates, ``k`` not a positive integer, or a band that is not two
            increasing positive numbers.
    """
    import torch

    from memscan.metrics import resolve_device

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError("k", f"must be a positive integer, got {k!r}")
    sigmas = list(band) if isinstance(band, (list, tuple)) else []
    if (len(sigmas) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0
                                for v in sigmas) or sigmas[0] >= sigmas[1]):
        raise InputError("band", f"expected (fine σ, coarse σ), two increasing positive numbers, got {band!r}")
    q_img, r_img, cand = _check_pairs(query_images, reference_images, candidates)
    dev = resolve_device(device)
    pl = _plane_axes(plane, q_img.ndim - 2)

    def passed(images: np.ndarray):  # blur(σ_fine) - blur(σ_coarse) = high-pass(σ_coarse) - high-pass(σ_fine)
        x = torch.as_tensor(images, dtype=torch.float32, device=dev)
        return _standardize_images(_highpass(x, float(sigmas[1]), pl) - _highpass(x, float(sigmas[0]), pl))[0]

    score = np.full(cand.shape, -np.inf)
    for start in range(0, len(cand), chunk):
        rows = cand[start:start + chunk]
        q = passed(q_img[start:start + len(rows)]).flatten(1)
        r = passed(r_img[np.maximum(rows, 0).ravel()]).flatten(1).reshape(len(rows), rows.shape[1], -1)
        score[start:start + len(rows)] = torch.einsum("nd,nkd->nk", q, r).double().cpu().numpy()
    score = np.where(cand >= 0, score, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(score, order, 1) > -np.inf, np.take_along_axis(cand, order, 1), -1)


def merge_candidates(first: np.ndarray, added: np.ndarray) -> np.ndarray:
    """Per row, ``first``'s candidates, then those of ``added`` not already among them (``-1`` = none, in either;
    a repeat becomes -1 in place, which :func:`deform_and_correlate` skips).

    Args:
        first: ``[N, K1]`` reference indices.
        added: ``[N, K2]`` reference indices.

    Returns:
        ``[N, K1 + K2]`` int64 reference indices.

    Raises:
        InputError: the two are not 2D with the same number of rows.
    """
    a, b = np.asarray(first), np.asarray(added)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise InputError("candidates", f"expected two [N, K] index arrays with the same N, got {a.shape} and {b.shape}")
    both = np.concatenate([a, b], axis=1).astype(np.int64)
    earlier = np.tril(np.ones((both.shape[1], both.shape[1]), dtype=bool), -1)  # [j, i]: i before j
    repeat = ((both[:, :, None] == both[:, None, :]) & earlier[None]).any(axis=2)
    return np.where(repeat | (both < 0), -1, both)


#: keys of a non-rigid fit's settings (``memscan.audit.ALIGN_DEFORM``) that choose which candidates it bends
#: (:func:`bend_candidates`: the rigid alignment's first ``k``, the band's ``band_k``), not how it fits them
BEND_CHOICE = ("k", "band_k", "band")


def bend_candidates(query_images: np.ndarray, reference_images: np.ndarray, ranked: np.ndarray,
                    pool: np.ndarray | None = None, *, k: int | None = None, band_k: int = 0,
                    band: Sequence[float] = (2.0, 8.0), plane: tuple[int, int] = (-2, -1),
                    device: Any = "auto") -> np.ndarray:
    """The candidates best-of-aligned's non-rigid fit bends onto each query: the rigid alignment's first ``k``
    (``ranked``, ``[n, K1]``; None: all), then the ``band_k`` of the retrieval's candidates (``pool``, ``[n, K]``,
    needed with a ``band_k``) whose band-passed pixels correlate best with the query's (:func:`bandpass_candidates`),
    where the rigid list lacks them (``-1`` in place of a repeat). Its keyword arguments ``k``, ``band_k`` and
    ``band`` are a fit setting's :data:`BEND_CHOICE`. ``memscan.audit``'s best-of-aligned and the detection
    benchmark's deform part.

    Raises:
        InputError: ``band_k`` not a non-negative integer, no ``pool`` with one, or a malformed band (see
            :func:`bandpass_candidates`).
    """
    if isinstance(band_k, bool) or not isinstance(band_k, (int, np.integer)) or band_k < 0:
        raise InputError("band_k", f"must be a non-negative integer, got {band_k!r}")
    first = np.asarray(ranked)[:, :k]
    if not band_k:
        return first
    if pool is None:
        raise InputError("pool", f"band_k {band_k} ranks the retrieval's candidates: pass them as pool")
    return merge_candidates(first, bandpass_candidates(query_images, reference_images, pool, int(band_k), band=band,
                                                       plane=plane, device=device))


# ----------------------------------------------------------------------------------------------------------------
# test-time non-rigid alignment
# ----------------------------------------------------------------------------------------------------------------
def _control_points(spatial: Sequence[int], spacing: float) -> list[int]:
    """Control points per axis of a displacement grid about ``spacing`` pixels apart (at least 2: a linear ramp)."""
    return [max(2, int(round(n / spacing)) + 1) for n in spatial]


def _cubic_basis(points: Sequence[int], spatial: Sequence[int]):
    """Each control point's cubic interpolation kernel over the image (torch's bicubic kernel, corners aligned, one
    axis at a time), torch ``[prod(points), prod(spatial)]``."""
    import torch
    import torch.nn.functional as F

    # hand-written: torch interpolates cubically in 2D only; a Kronecker product of its 1D kernels is the same
    # separable cubic in any dimensionality (trilinear had capped a strong 3D warp's best fit at r 0.98)
    basis = torch.ones(1, 1)
    for n_points, n in zip(points, spatial):
        axis = F.interpolate(torch.eye(n_points).reshape(n_points, 1, 1, n_points), size=(1, n), mode="bicubic",
                             align_corners=True).reshape(n_points, n)
        basis = torch.einsum("ax,by->abxy", basis, axis).reshape(basis.shape[0] * n_points, -1)
    return basis


#: Steps of curvature each pair's L-BFGS keeps (``deform_and_correlate(optimizer="lbfgs")``).
LBFGS_HISTORY = 10


def _pairwise_lbfgs(loss, params, iterations: int, history: int = LBFGS_HISTORY, armijo: float = 1e-4,
                    backtracks: int = 6, max_step: float | None = None) -> None:
    """Minimise ``loss(params, rows)`` ([P] values, one independent problem per row of ``params`` [P, ...]; ``rows``:
    None for every row, else the row indices that ``params`` holds) in place by L-BFGS, every row with its own
    curvature pairs and its own backtracking (Armijo) step from 1, no parameter moving by more than ``max_step`` in
    one step (None: no bound). A backtracking trial evaluates only the rows that still need one.

    hand-written: ``torch.optim.LBFGS`` treats the batch as one problem (one history, one line search), so a pair's
    fit, and its score, would depend on the pairs it happens to share a batch with.
    """
    import torch

    n = len(params)
    x = params.detach().reshape(n, -1).clone()

    def value_and_grad(v, rows=None):
        v = v.detach().requires_grad_(True)
        f = loss(v.reshape(len(v), *params.shape[1:]), rows)
        (g,) = torch.autograd.grad(f.sum(), v)
        return f.detach(), g

    f, g = value_and_grad(x)
    steps, changes, inverse = [], [], []
    for _ in range(iterations):
        # two-loop recursion, per row
        d, alphas = g.clone(), []
        for s, y, r in zip(reversed(steps), reversed(changes), reversed(inverse)):
            a = r * (s * d).sum(1)
            alphas.append(a)
            d -= a[:, None] * y
        if steps:
            sy, yy = (steps[-1] * changes[-1]).sum(1), (changes[-1] * changes[-1]).sum(1)
            d *= torch.where(sy > 0, sy / yy.clamp_min(1e-20), torch.ones_like(sy))[:, None]
        else:  # the first step moves no parameter further than 1 (as torch's LBFGS does)
            d /= g.abs().sum(1).clamp_min(1.0)[:, None]
        for s, y, r, a in zip(steps, changes, inverse, reversed(alphas)):
            d += (a - r * (y * d).sum(1))[:, None] * s
        d = -d
        slope = (g * d).sum(1)
        uphill = slope >= 0
        if uphill.any():  # a stale curvature pair: fall back to the gradient
            d[uphill] = -g[uphill]
            slope = (g * d).sum(1)
        if max_step is not None:
            shrink = (float(max_step) / d.abs().amax(1).clamp_min(1e-20)).clamp_max(1.0)
            d, slope = d * shrink[:, None], slope * shrink
        # each trial takes its gradient too: the first trial passes nearly always, and is then the next step's
        t = torch.ones(n, dtype=x.dtype, device=x.device)
        f_new, g_new = value_and_grad(x + d)
        ok = f_new <= f + armijo * slope
        for _ in range(backtracks):
            retry = torch.nonzero(~ok)[:, 0]
            if not len(retry):
                break
            t[retry] /= 2
            f_new[retry], g_new[retry] = value_and_grad(x[retry] + t[retry, None] * d[retry], retry)
            ok[retry] = f_new[retry] <= f[retry] + armijo * t[retry] * slope[retry]
        t = torch.where(ok, t, torch.zeros_like(t))  # no step decreased the loss enough: stay
        f, g_new = torch.where(ok, f_new, f), torch.where(ok[:, None], g_new, g)
        x_new = x + t[:, None] * d
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        steps.append(s)
        changes.append(y)
        inverse.append(torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy)))
        del steps[:-history], changes[:-history], inverse[:-history]
        x, g = x_new, g_new
    with torch.no_grad():
        params.copy_(x.reshape(params.shape))


def deform_and_correlate(query_images: np.ndarray, reference_images: np.ndarray, candidates: np.ndarray, *,
                         spacing: float = 12.0, max_displacement: float = 3.0, iterations: int = 60,
                         learning_rate: float = 0.3, fit_highpass: float | Sequence[float] = 2.0,
                         highpass: float = 1.0, margin: int | None = None, optimizer: str = "adam",
                         max_step: float | None = None,
                         plane: tuple[int, int] = (-2, -1), size: int | Sequence[int] | None = None,
                         device: Any = "auto", budget: int | None = None) -> AlignedMatch:
    """Verify retrieval candidates by bending each one onto its query with a smooth, small displacement field.

    A generator that memorised an image may reproduce it locally stretched (an elastic warp): no rotation, zoom or
    shift lines it up again (:func:`align_and_correlate`), but a displacement field of a few pixels does. For every
    (query, candidate) pair a displacement per control point (about ``spacing`` pixels apart on every spatial axis,
    interpolated smoothly between them, each bounded by ``max_displacement`` pixels) is fitted by ``iterations``
    steps to maximise the Pearson correlation of the query and the warped candidate, both high-passed, the
    candidate after it is bent, as a copy's detail was (``fit_highpass``: σ of the blur subtracted, pixels; several
    σ, coarse first, fit coarse-to-fine, ``iterations`` steps each, the field carried from one to the next); the
    pair's score is then the correlation of the finer detail (``highpass``) at that field, over the image less a
    ``margin`` at every edge: a warp can pull in content from beyond the image's edge (padding, or anatomy the
    reference never showed), which no field reproduces. The
    field is too coarse and too small to turn one patient's anatomy into another's, so other patients' images gain
    less than copies do. The field between control points is cubic along every axis (2D and 3D alike). The fit
    climbs with Adam or with L-BFGS (``optimizer``), each pair on its own path. Apply the same function to the
    calibration pairs
    (as for :func:`align_and_correlate`) so that τ is the null of the same fit. 2D and 3D share one path.

    Args:
        query_images: ``[N, C, *spatial]`` (2 or 3 spatial axes).
        reference_images: ``[M, C, *spatial]``, same C and spatial shape.
        candidates: ``[N, K]`` reference indices per query (``-1`` = no candidate).
        spacing: distance in pixels (at ``size``) between control points of the displacement field.
        max_displacement: largest displacement of a control point in pixels, per axis (bounded by a tanh).
        iterations: steps of the fit (per ``fit_highpass`` stage).
        learning_rate: Adam's step size on the unbounded parameters (L-BFGS sizes its own steps).
        optimizer: ``"adam"`` or ``"lbfgs"``: L-BFGS with :data:`LBFGS_HISTORY` steps of curvature and a
            backtracking line search, both per pair; it climbs to the top of a smooth fit's peak where Adam's
            fixed step circles it (a strong 3D warp bent back by its true source: median r 0.96 with Adam, 0.98
            with L-BFGS; docs/benchmarks/detection_candidates.md section 24).
        max_step: L-BFGS only: the most any field parameter (before the tanh bound) moves in one step, or None for
            no bound. A long first leap can land where the tanh saturates, a basin the fit does not leave (a weakly
            warped 2D copy stuck at r 0.91 where Adam reached 0.99; section 25).
        fit_highpass: σ in pixels of the blur subtracted before the fit, in ``plane`` (smoother to climb); a
            sequence fits coarse-to-fine, one stage per σ in its order (a broad σ first widens the basin of the
            true field, which a displacement of a few pixels otherwise leaves on fine detail).
        highpass: σ in pixels of the blur subtracted before the pair's score, in ``plane``.
        margin: pixels left out of the score at both ends of every spatial axis (at most a quarter of the axis);
            None: ``ceil(max_displacement) + 1``, as far as the field reaches.
        plane: the two spatial axes (negative = from the end) of the high-pass filters.
        size: spatial size of the comparison (int for every axis) or None for the input size.
        device: where the fit runs (``"auto"``: CUDA when available).
        budget: pixels held per step of pairs (default 2²² on a CPU, 2²⁶ on a GPU).

    Returns:
        :class:`AlignedMatch`; ``pixel`` holds every candidate's score, ``fused`` the same values.

    Raises:
        InputError: malformed images, candidates or settings.
    """
    # hand-written: MONAI's registration losses and warps fit one pair at a time; this fits every pair as one batch
    import torch
    import torch.nn.functional as F

    from memscan.metrics import resolve_device

    dev = resolve_device(device)
    if budget is None:
        budget = 1 << (26 if dev.type == "cuda" else 22)
    q_img, r_img, cand = _check_pairs(query_images, reference_images, candidates)
    dims = q_img.ndim - 2
    stages = list(fit_highpass) if isinstance(fit_highpass, (list, tuple)) else [fit_highpass]
    if not stages:
        raise InputError("fit_highpass", "expected a positive number or a non-empty list of them, got []")
    for name, value in (("spacing", spacing), ("max_displacement", max_displacement),
                        ("learning_rate", learning_rate), *(("fit_highpass", v) for v in stages),
                        ("highpass", highpass)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise InputError(name, f"expected a positive number, got {value!r}")
    if optimizer not in ("adam", "lbfgs"):
        raise InputError("optimizer", f"expected 'adam' or 'lbfgs', got {optimizer!r}")
    if max_step is not None and (isinstance(max_step, bool) or not isinstance(max_step, (int, float))
                                 or not np.isfinite(max_step) or max_step <= 0):
        raise InputError("max_step", f"expected a positive number or None, got {max_step!r}")
    for name, value in (("iterations", iterations), ("margin", 0 if margin is None else margin)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(name, f"expected a non-negative integer, got {value!r}")
    pl = _plane_axes(plane, dims)
    q_t, r_t = _at_size(q_img, r_img, size)
    spatial = list(q_t.shape[2:])
    edge = int(np.ceil(max_displacement)) + 1 if margin is None else int(margin)
    cuts = [min(edge, s // 4) for s in spatial]  # at most a quarter of each axis
    interior = (Ellipsis, *(slice(c, s - c) for c, s in zip(cuts, spatial)))
    points = _control_points(spatial, float(spacing))
    # the smooth field as one matrix product: each control point's interpolation kernel over the image, [control
    # points, pixels]; far cheaper to differentiate than interpolate()
    n_pix = int(np.prod(spatial))
    basis = _cubic_basis(points, spatial).to(dev)
    n_ctrl = basis.shape[0]
    # pixel displacement → grid_sample's normalised (x = last axis, y, z) offsets
    to_norm = torch.tensor([2.0 / s for s in reversed(spatial)], dtype=torch.float32, device=dev)
    # the reference is bent first and high-passed after, at every step and for the score, as the copy was: where a
    # field stretches, a blur taken before the bend is stretched with it and no longer matches the copy's own detail
    # (high-passing once before the fit capped a stretched copy bent by its true field at r ≈ 0.95)
    q_eval, q_norm = _standardize_images(_highpass(q_t, float(highpass), pl)[interior])
    if (q_norm <= 1e-12).any():
        raise InputError("query_images", "an image has no detail finer than the high-pass blur: its correlation is "
                                         "undefined", row=int(torch.argmin(q_norm)))
    fits = [(_standardize_images(_highpass(q_t, float(sigma), pl))[0], float(sigma)) for sigma in stages]
    rows, cols = np.nonzero(cand >= 0)
    pixel = np.full(cand.shape, -np.inf)
    step = max(1, int(budget) // max(1, n_pix * q_t.shape[1] * 8))
    identity = F.affine_grid(torch.eye(dims, dims + 1, device=dev)[None], [1, 1, *spatial], align_corners=False)

    def warp(refs, params):
        field = (float(max_displacement) * torch.tanh(params)) @ basis  # [P, dims (tensor-axis order), pixels]
        field = field.reshape(len(refs), dims, *spatial).movedim(1, -1).flip(-1) * to_norm
        return F.grid_sample(refs, identity + field, mode="bilinear", padding_mode="border", align_corners=False)

    for start in range(0, len(rows), step):
        p_rows, p_cols = rows[start:start + step], cols[start:start + step]
        pair_ref = torch.from_numpy(cand[p_rows, p_cols])
        q_sel = torch.from_numpy(p_rows)
        params = torch.zeros(len(p_rows), dims, n_ctrl, device=dev, requires_grad=True)
        refs = r_t[pair_ref].to(dev)
        for q_fit, sigma in fits:
            target_fit = q_fit[q_sel].to(dev)

            def pair_loss(p, rows=None, target=target_fit, sigma=sigma):  # minus each pair's correlation, [P]
                own, bent = (target, warp(refs, p)) if rows is None else (target[rows], warp(refs[rows], p))
                return -(own * _standardize_images(_highpass(bent, sigma, pl))[0]).flatten(1).sum(1)

            if optimizer == "lbfgs":
                _pairwise_lbfgs(pair_loss, params, int(iterations), max_step=max_step)
                continue
            opt = torch.optim.Adam([params], lr=float(learning_rate))
            for _ in range(int(iterations)):
                loss = pair_loss(params).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            bent = _highpass(warp(refs, params), float(highpass), pl)
            value = _correlate_warped(q_eval[q_sel].to(dev), bent[interior])
        pixel[p_rows, p_cols] = value.double().cpu().numpy()
    pixel = np.where(cand >= 0, np.clip(pixel, -1.0, 1.0), -np.inf)
    return _best_candidates(cand, pixel, pixel.copy())
