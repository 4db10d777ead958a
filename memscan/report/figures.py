"""Figures of a memorization audit, drawn with matplotlib's Agg backend (no display needed).

* :func:`plot_distributions` — the paper's figure (Dar et al., Fig. 2/3): the distribution of every training
  image's best validation correlation (what τ is calibrated on) beside its best synthetic correlation, τ marked;
  one panel per synthetic set, side by side.
* :func:`plot_pair_gallery` — ranked training/synthetic pairs with their correlation: the strongest copies, or the
  borderline pairs just below τ. A 3D volume is shown as a row of evenly spaced slices (the paper showed six).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, no display, no
backend switch: PNGs are rendered by Agg), so the library is safe headless and in notebooks, where a returned
figure displays inline; :func:`figure_to_png` turns one into PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "PairImage",
    "plot_distributions",
    "plot_pair_gallery",
    "display_slices",
    "figure_to_png",
]

_VAL_COLOUR = "#4c72b0"
_SYN_COLOUR = "#dd8452"
_TAU_COLOUR = "#c44e52"


@dataclass
class PairImage:
    """One training/synthetic pair for a gallery.

    Args:
        train_image: the training image as the encoder saw it, channel-first (C, H, W) or (C, D, H, W), or without
            the channel axis.
        synthetic_image: the synthetic image, same conventions.
        correlation: Pearson correlation of their embeddings.
        train_label: short caption for the training image (a file name).
        synthetic_label: short caption for the synthetic image.
        second_image: a blended synthetic image's other training source (same conventions), or None.
        second_label: short caption for ``second_image``.
    """

    train_image: np.ndarray
    synthetic_image: np.ndarray
    correlation: float
    train_label: str = ""
    synthetic_label: str = ""
    extra: dict = field(default_factory=dict)
    second_image: np.ndarray | None = None
    second_label: str = ""


def _as_numpy(image: object) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()  # torch tensor / MONAI MetaTensor
    return np.asarray(image, dtype=np.float32)


def display_slices(image: object, n_slices: int = 6, spatial_dims: int | None = None) -> list[np.ndarray]:
    """Return the 2-D arrays to display for one image.

    A 2D image gives one panel. A 3D volume gives ``n_slices`` evenly spaced slices along its shortest spatial
    axis (the slice axis of anisotropic scans such as the paper's 32×256×256 knee MRI; the last axis when sizes
    tie), leaving out the outermost slices. Slices of a volume are rotated by 90° so that a RAS-oriented volume
    (MONAI ``Orientationd(axcodes="RAS")``) shows anterior/superior up.

    Args:
        image: array or tensor, channel-first (``(C, H, W)`` / ``(C, D, H, W)``, first channel shown) or without
            a channel axis.
        n_slices: slices per 3D volume.
        spatial_dims: 2 or 3 when known; otherwise inferred (4 axes or a leading axis of size 1 is a channel).

    Returns:
        list of 2-D float arrays.

    Raises:
        ValueError: for arrays that are not 2D or 3D images.
    """
    arr = _as_numpy(image)
    if spatial_dims is None:
        has_channel = arr.ndim == 4 or (arr.ndim == 3 and arr.shape[0] == 1)
    else:
        has_channel = arr.ndim == spatial_dims + 1
    if has_channel:
        arr = arr[0]
    if arr.ndim == 2:
        return [arr]
    if arr.ndim != 3:
        raise ValueError(f"cannot display an image of shape {arr.shape}")
    axis = 2 - int(np.argmin(arr.shape[::-1]))  # shortest axis; ties resolve to the last one
    depth = arr.shape[axis]
    count = max(1, min(n_slices, depth))
    positions = np.linspace(0, depth - 1, count + 2)[1:-1] if depth > count + 1 else np.arange(count)
    return [np.rot90(np.take(arr, int(round(p)), axis=axis)) for p in positions]


def plot_distributions(
    best_val_for_train: np.ndarray,
    best_synthetic_for_train: Mapping[str, np.ndarray],
    threshold: float,
    *,
    percentile: float = 95.0,
    headroom: float = 0.0,
    bins: int = 40,
    score_name: str = "Pearson correlation",
) -> Figure:
    """The paper's figure: best train→validation vs best train→synthetic correlation, τ marked.

    Args:
        best_val_for_train: for every training image, its best correlation with a validation image.
        best_synthetic_for_train: synthetic set name → for every training image, its best correlation with that
            set. One panel per set, side by side, sharing the y axis.
        threshold: τ.
        percentile: the percentile τ was taken at (for the legend).
        headroom: the share of the way to 1 that τ was raised by from that percentile (for the legend).
        bins: histogram bins (shared edges across panels).
        score_name: what the values are, for the x axis (e.g. ``"best-of score"`` when they are not correlations).

    Returns:
        the figure.
    """
    names = list(best_synthetic_for_train)
    n = max(1, len(names))
    fig = Figure(figsize=(5.2 * n, 3.8))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)
    val = np.asarray(best_val_for_train, dtype=np.float64)
    arrays = [np.asarray(best_synthetic_for_train[k], dtype=np.float64) for k in names]
    everything = np.concatenate([val, *arrays, [threshold]]) if arrays else np.concatenate([val, [threshold]])
    everything = everything[np.isfinite(everything)]
    low, high = float(everything.min()), float(everything.max())
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    edges = np.linspace(low, high, bins + 1)
    for ax, name, syn in zip(axes[0], names or [""], arrays or [None]):
        ax.hist(val, bins=edges, density=True, alpha=0.55, color=_VAL_COLOUR, label="train → validation (real)")
        if syn is not None:
            ax.hist(syn, bins=edges, density=True, alpha=0.55, color=_SYN_COLOUR, label="train → synthetic")
        ax.axvline(threshold, color=_TAU_COLOUR, linestyle="--", linewidth=1.6,
                   label=f"τ = {threshold:.3f} ({percentile:g}th pct." + (f" + headroom {headroom:g})" if headroom
                                                                          else ")"))
        n_mem = int(np.sum(syn > threshold)) if syn is not None else 0
        ax.set_title(f"{name}: {n_mem} of {len(val)} training images above τ" if name else "validation")
        ax.set_xlabel(f"best {score_name} of each training image")
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    return fig


def plot_pair_gallery(
    pairs: Sequence[PairImage],
    *,
    title: str = "",
    threshold: float | None = None,
    n_slices: int = 6,
    max_pairs: int = 8,
    spatial_dims: int | None = None,
    pairs_per_row: int = 4,
    score_symbol: str = "r",
) -> Figure:
    """Ranked gallery: each training image beside its synthetic match, with their correlation.

    2D pairs are laid out ``pairs_per_row`` to a row (training panel, then synthetic panel). A 3D pair takes a
    whole row: ``n_slices`` evenly spaced slices of the training volume, then the same slices of the synthetic one.
    Training panels have a blue frame, synthetic panels an orange one. Where a pair has a ``second_image`` (a
    blend's other source), every pair gets a third panel for it, after the synthetic one (blank where it has none).

    Args:
        pairs: pairs in the order to show (strongest first).
        title: figure title.
        threshold: τ, printed beside each correlation when given.
        n_slices: slices per 3D volume.
        max_pairs: at most this many pairs.
        spatial_dims: 2 or 3 when known (see :func:`display_slices`).
        pairs_per_row: 2D pairs per row (fewer when there are fewer pairs).
        score_symbol: printed before each pair's value (``"r"`` for a correlation, e.g. ``"score"`` otherwise).

    Returns:
        the figure (a short "none" figure when ``pairs`` is empty).
    """
    pairs = list(pairs)[:max_pairs]
    if not pairs:
        fig = Figure(figsize=(6, 0.9))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: none", ha="center", va="center", fontsize=11)
        return fig
    views = [(display_slices(p.train_image, n_slices, spatial_dims),
              display_slices(p.synthetic_image, n_slices, spatial_dims),
              [] if p.second_image is None else display_slices(p.second_image, n_slices, spatial_dims))
             for p in pairs]
    sides = 3 if any(p.second_image is not None for p in pairs) else 2
    per_side = max(max(len(t), len(s), len(b)) for t, s, b in views)
    per_row = min(len(pairs), max(1, pairs_per_row)) if per_side == 1 else 1  # no empty columns for few pairs
    n_rows = math.ceil(len(pairs) / per_row)
    n_cols = per_row * sides * per_side
    panel = 1.55 if per_side > 1 else 2.0
    fig = Figure(figsize=(panel * n_cols, (panel + 0.35) * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (pair, (t_sl, s_sl, b_sl)) in enumerate(zip(pairs, views)):
        row, first_col = divmod(k, per_row)
        first_col *= sides * per_side
        for side, slices, colour in ((0, t_sl, _VAL_COLOUR), (1, s_sl, _SYN_COLOUR), (2, b_sl, _VAL_COLOUR)):
            for j, img in enumerate(slices):
                ax = axes[row][first_col + side * per_side + j]
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
        corr = f"{score_symbol}={pair.correlation:.4f}"
        if threshold is not None:
            corr += f" (τ={threshold:.4f})"
        width = 24 if per_side == 1 else 60
        axes[row][first_col].set_title(f"#{k + 1} train: {_short(pair.train_label, width)}", fontsize=7, loc="left")
        axes[row][first_col + per_side].set_title(f"{_short(pair.synthetic_label, width)}\n{corr}", fontsize=7,
                                                  loc="left")
        if b_sl:
            axes[row][first_col + 2 * per_side].set_title(f"blended with: {_short(pair.second_label, width)}",
                                                          fontsize=7, loc="left")
    if title:
        fig.suptitle(f"{title}  (blue frame: training image, orange frame: synthetic image)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if n_rows > 1 else 0.9))
    return fig


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def figure_to_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes with Agg (no software tag or URL in the PNG metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()
