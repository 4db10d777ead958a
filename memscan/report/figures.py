"""Figures of a memorization audit, drawn with matplotlib's Agg backend (no display needed).

* :func:`plot_distributions` — the paper's figure (Dar et al., Fig. 2/3): the distribution of every training
  image's best validation correlation (what τ is calibrated on) beside its best synthetic correlation, τ marked;
  one panel per synthetic set, side by side.
* :func:`plot_pair_gallery` — ranked training/synthetic pairs with their correlation: the strongest copies, or the
  borderline pairs just below τ. A 3D volume is shown as a row of evenly spaced slices (the paper showed six).

Every function returns a :class:`matplotlib.figure.Figure`; :func:`figure_to_png` turns one into PNG bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "PairImage",
    "plot_distributions",
    "plot_pair_gallery",
    "display_slices",
    "figure_to_png",
    "save_figure",
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
    """

    train_image: np.ndarray
    synthetic_image: np.ndarray
    correlation: float
    train_label: str = ""
    synthetic_label: str = ""
    extra: dict = field(default_factory=dict)


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
    bins: int = 40,
) -> Figure:
    """The paper's figure: best train→validation vs best train→synthetic correlation, τ marked.

    Args:
        best_val_for_train: for every training image, its best correlation with a validation image.
        best_synthetic_for_train: synthetic set name → for every training image, its best correlation with that
            set. One panel per set, side by side, sharing the y axis.
        threshold: τ.
        percentile: the percentile τ was taken at (for the legend).
        bins: histogram bins (shared edges across panels).

    Returns:
        the figure.
    """
    names = list(best_synthetic_for_train)
    n = max(1, len(names))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), sharey=True, squeeze=False)
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
                   label=f"τ = {threshold:.3f} ({percentile:g}th pct.)")
        n_mem = int(np.sum(syn > threshold)) if syn is not None else 0
        ax.set_title(f"{name}: {n_mem} of {len(val)} training images above τ" if name else "validation")
        ax.set_xlabel("best Pearson correlation of each training image")
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
) -> Figure:
    """Ranked gallery: each row a training image beside its synthetic match, with their correlation.

    For 2D the row holds two panels (training, synthetic). For 3D it holds ``n_slices`` evenly spaced slices of
    the training volume followed by the same slices of the synthetic volume.

    Args:
        pairs: pairs in the order to show (strongest first).
        title: figure title.
        threshold: τ, printed beside each correlation when given.
        n_slices: slices per 3D volume.
        max_pairs: at most this many rows.
        spatial_dims: 2 or 3 when known (see :func:`display_slices`).

    Returns:
        the figure (a short "none" figure when ``pairs`` is empty).
    """
    pairs = list(pairs)[:max_pairs]
    if not pairs:
        fig, ax = plt.subplots(figsize=(6, 0.9))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: none", ha="center", va="center", fontsize=11)
        return fig
    rows = [
        (display_slices(p.train_image, n_slices, spatial_dims), display_slices(p.synthetic_image, n_slices, spatial_dims))
        for p in pairs
    ]
    n_cols = max(len(t) + len(s) for t, s in rows)
    per_side = n_cols // 2
    panel = 1.6 if per_side > 1 else 2.4
    fig, axes = plt.subplots(len(pairs), n_cols, figsize=(panel * n_cols, panel * len(pairs) + 0.6), squeeze=False)
    for r, (pair, (t_sl, s_sl)) in enumerate(zip(pairs, rows)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            side, idx = (t_sl, c) if c < per_side else (s_sl, c - per_side)
            if idx >= len(side):
                ax.axis("off")
                continue
            img = side[idx]
            lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
            ax.imshow(img, cmap="gray", vmin=lo,
                      vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_edgecolor(_VAL_COLOUR if c < per_side else _SYN_COLOUR)
                spine.set_linewidth(2)
        corr = f"r = {pair.correlation:.4f}"
        if threshold is not None:
            corr += f" (τ = {threshold:.4f})"
        axes[r][0].set_ylabel(f"#{r + 1}", rotation=0, labelpad=14, fontsize=9)
        axes[r][0].set_title(_short(pair.train_label, 38) or "training", fontsize=7, loc="left")
        axes[r][per_side].set_title(f"{_short(pair.synthetic_label, 30) or 'synthetic'}   {corr}", fontsize=7,
                                    loc="left")
    if title:
        fig.suptitle(f"{title}  (blue: training, orange: synthetic)", fontsize=10)
    fig.tight_layout()
    return fig


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def figure_to_png(fig: Figure, *, dpi: int = 110, close: bool = True) -> bytes:
    """Render a figure to PNG bytes (and close it unless ``close=False``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    if close:
        plt.close(fig)
    return buf.getvalue()


def save_figure(png: bytes, path: str | os.PathLike[str]) -> None:
    """Write PNG bytes atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, path)
