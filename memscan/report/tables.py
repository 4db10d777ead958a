"""Tables and plain-language verdicts of an audit, from its per-set summary blocks and per-sample tables.

The audit writes one block per synthetic set (see :func:`memscan.audit.audit`); these helpers turn such blocks
into what a reviewer reads: headline numbers with 95% intervals, a verdict, the ranked copies and the borderline
pairs just below τ. Every function is pure (no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = [
    "interval",
    "format_fraction",
    "threshold_rule",
    "verdict",
    "set_headline",
    "comparison_table",
    "ranked_pairs",
    "SYNTHETIC_COLUMNS",
]

#: Columns the audit's synthetic table carries (beyond the metric module's own) and the report relies on.
SYNTHETIC_COLUMNS = ("synthetic_set", "synthetic_index", "path", "best_train_index", "train_path",
                     "best_train_correlation", "copy")


def interval(block: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """Return the 95% interval stored for ``key`` in a summary block, or ``None``.

    Accepts ``key + "_ci95"`` (the metric module's) or ``key + "_ci"`` as a two-element list, or
    ``key + "_ci_low"`` / ``key + "_ci_high"``.
    """
    for suffix in ("_ci95", "_ci"):
        ci = block.get(f"{key}{suffix}")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(v) for v in ci):
            return float(ci[0]), float(ci[1])
    low, high = block.get(f"{key}_ci_low"), block.get(f"{key}_ci_high")
    if _finite(low) and _finite(high):
        return float(low), float(high)
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_fraction(value: float | None, ci: tuple[float, float] | None = None) -> str:
    """``0.125, (0.05, 0.2)`` → ``"12.5% (95% CI 5.0–20.0%)"``; ``None`` → ``"n/a"``."""
    if not _finite(value):
        return "n/a"
    text = f"{100 * value:.1f}%"
    if ci is not None:
        text += f" (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)"
    return text


def threshold_rule(summary: Mapping[str, Any]) -> str:
    """How τ was set, in words: ``"95th percentile"``, or with a headroom (:func:`memscan.metrics.with_headroom`)
    ``"95th percentile (0.8123) + 0.5 of the way to 1"``."""
    rule = f"{float(summary.get('percentile', 95.0)):g}th percentile"
    headroom = float(summary.get("headroom") or 0.0)
    if headroom:
        rule += f" ({float(summary['percentile_threshold']):.4f}) + {headroom:g} of the way to 1"
    return rule


def _chance_rate(block: Mapping[str, Any]) -> float:
    """Copy rate that τ gives real images of new patients: ``null_rate_copies``, else ``null_rate``, else 1−p."""
    for key in ("null_rate_copies", "null_rate"):
        if _finite(block.get(key)):
            return float(block[key])
    return 1.0 - float(block.get("percentile", 95.0)) / 100.0


def verdict(block: Mapping[str, Any]) -> tuple[str, str]:
    """Plain-language verdict for one synthetic set.

    Rules: no synthetic image above τ → ``"clean"``; the copy fraction's lower 95% bound (or the fraction itself
    when no interval exists) above the rate at which τ flags held-out real images of other patients as copies
    (``null_rate_copies`` of :func:`memscan.metrics.match`, else ``null_rate``, else (100−p)%) → ``"copies"``;
    otherwise ``"review"`` (matches within what chance explains, still worth a look).

    Args:
        block: a per-set summary block with ``n_copies_synthetic``, ``n_synthetic``, ``frac_copies_synthetic``,
            optional intervals, ``null_rate``, ``n_memorized_train``, ``n_train``, ``n_memorized_subjects``,
            ``n_train_subjects``.

    Returns:
        (level, text).
    """
    n_copies = int(block.get("n_copies_synthetic", 0))
    n_syn = int(block.get("n_synthetic", 0))
    frac = float(block.get("frac_copies_synthetic", 0.0))
    ci = interval(block, "frac_copies_synthetic")
    chance = _chance_rate(block)
    n_mem = int(block.get("n_memorized_train", 0))
    n_train = int(block.get("n_train", 0))
    subj = block.get("n_memorized_subjects")
    subj_total = block.get("n_train_subjects")
    patients = ""
    if subj is not None and subj_total:
        patients = f" {int(subj)} of {int(subj_total)} training patients have at least one image copied."
    if n_copies == 0:
        return "clean", (f"No synthetic image is closer to a training image than the threshold τ "
                         f"(0 of {n_syn}). No sign that this model reproduces its training patients.")
    lower = ci[0] if ci is not None else frac
    share = format_fraction(frac, ci)
    if lower > chance:
        return "copies", (f"{n_copies} of {n_syn} synthetic images ({share}) are copies of training images — more "
                          f"than the {100 * chance:.1f}% that the threshold flags among real images of other "
                          f"patients. {n_mem} of {n_train} training images are reproduced.{patients} "
                          f"Do not release this set as it is; review the gallery below.")
    return "review", (f"{n_copies} of {n_syn} synthetic images ({share}) are above τ, which is within the "
                      f"{100 * chance:.1f}% that the threshold flags among real images of other patients. "
                      f"No clear sign of systematic copying, but look at the flagged pairs below.{patients}")


def set_headline(block: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) cards for one synthetic set."""
    items = [
        ("synthetic images audited", str(block.get("n_synthetic", "n/a"))),
        ("copies (synthetic above τ)", f"{block.get('n_copies_synthetic', 'n/a')} = "
         + format_fraction(block.get("frac_copies_synthetic"), interval(block, "frac_copies_synthetic"))),
        ("memorized training images", f"{block.get('n_memorized_train', 'n/a')} = "
         + format_fraction(block.get("frac_memorized_train"), interval(block, "frac_memorized_train"))),
    ]
    if block.get("n_train_subjects"):
        items.append(("training patients with ≥1 copy",
                      f"{block.get('n_memorized_subjects', 0)} of {block.get('n_train_subjects')}"))
    null = block.get("null_rate_copies", block.get("null_rate"))
    items.append(("null rate (new-patient real images flagged by τ)", format_fraction(null)))
    ct = block.get("data_copying_ct")
    if _finite(ct):
        items.append(("data-copying C_T (Meehan; ≪0 = copying)", f"{ct:+.2f}"))
    auth = block.get("authenticity")
    if _finite(auth):
        items.append(("authenticity (Alaa; 1 = all authentic)", f"{auth:.3f}"))
    controls = block.get("controls")
    if isinstance(controls, Mapping) and controls.get("n"):
        items.append(("positive controls caught", f"{controls.get('n_caught', 0)} of {controls.get('n')}"))
    return items


def comparison_table(blocks: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per synthetic set, the headline numbers side by side."""
    rows = []
    for name, block in blocks.items():
        rows.append({
            "synthetic set": name,
            "verdict": verdict(block)[0],
            "images": block.get("n_synthetic"),
            "copies": block.get("n_copies_synthetic"),
            "copy fraction": format_fraction(block.get("frac_copies_synthetic"),
                                             interval(block, "frac_copies_synthetic")),
            "memorized training images": format_fraction(block.get("frac_memorized_train"),
                                                         interval(block, "frac_memorized_train")),
            "patients with ≥1 copy": (f"{block.get('n_memorized_subjects')} of {block.get('n_train_subjects')}"
                                      if block.get("n_train_subjects") else "n/a"),
            "C_T": (f"{block['data_copying_ct']:+.2f}" if _finite(block.get("data_copying_ct")) else "n/a"),
            "authenticity": (f"{block['authenticity']:.3f}" if _finite(block.get("authenticity")) else "n/a"),
        })
    return pd.DataFrame(rows)


def ranked_pairs(table: pd.DataFrame, threshold: float, *, kind: str = "copies", n: int = 8) -> pd.DataFrame:
    """The pairs a reviewer should look at, strongest first.

    Args:
        table: one set's synthetic table with :data:`SYNTHETIC_COLUMNS`.
        threshold: τ.
        kind: ``"copies"`` — synthetic images above τ, highest correlation first; ``"borderline"`` — the highest
            ones at or below τ (just missed the cut).
        n: at most this many rows.

    Returns:
        the selected rows (a copy), with a ``margin`` column (correlation − τ).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    corr = table["best_train_correlation"]
    if kind == "copies":
        chosen = table[corr > threshold]
    elif kind == "borderline":
        chosen = table[corr <= threshold]
    else:
        raise ValueError(f"kind must be 'copies' or 'borderline', got {kind!r}")
    chosen = chosen.sort_values(["best_train_correlation", "synthetic_index"], ascending=[False, True]).head(n)
    chosen = chosen.copy()
    chosen["margin"] = chosen["best_train_correlation"] - threshold
    return chosen
