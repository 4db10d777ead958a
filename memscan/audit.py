"""The memorization audit: image folders in, a report a privacy reviewer can act on out.

:func:`audit` runs the whole method of Dar et al. ("Unconditional latent diffusion models memorize patient imaging
data", Nat. Biomed. Eng. 2025) end to end, the same way from Python, from ``memscan audit`` and from a bundle's
``configs/audit.json``:

1. **Preflight** — every set through :func:`memscan.data.load_image_set` and :func:`memscan.data.check_sets`
   (unreadable files skipped and listed, patient / duplicate overlap warned about, an unusable input refused).
2. **Encoder** — a given checkpoint (or a bundle's ``models/model.pt``) is loaded; otherwise a small
   self-supervised encoder is trained on the training set with :func:`memscan.training.train_encoder`.
3. **Embeddings** — every set through :func:`memscan.embed.embed_images` (batched; cached by file content hash and
   checkpoint sha256, so an interrupted audit resumes where it stopped). The default score
   (:data:`DEFAULT_SCORE`, ``"best-of-aligned"``) retrieves each query's candidates by :mod:`memscan.scoring`'s
   flip-invariant pixel + embedding fusion (:func:`score_features`) and matches pixel Pearson at two sizes, the
   full-size pixels' Spearman correlation, the aligned high-passed pixels of those candidates, the same candidates
   bent onto the query, and those bent pairs' fused score mixed with their bent one (in 3D the fused score itself),
   side by side.
4. **Matching** — :func:`memscan.metrics.match` per synthetic set (τ from train→validation, raised by the score's
   :func:`default_headroom` unless one is given; copies, memorized
   training images, bootstrap intervals, null rate), plus the patient-level count, the positive controls, and two
   aggregate statistics from the literature (:func:`data_copying_statistic`, :func:`authenticity_score`).
5. **Outputs** in ``out_dir`` (all written atomically): ``summary.json``, ``train_matches.csv``,
   ``synthetic_matches.csv``, ``skipped.csv``, ``embeddings/{train,val,<name>}.npy`` with ``*_files.csv``,
   ``figures/*.png`` and the self-contained ``report.html``.

:func:`build_demo` and :func:`run_demo` build and audit the embedded demo data (``memscan demo``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from memscan import __version__
from memscan.errors import InputError
from memscan.io import (copy_file_atomic, json_safe, save_npy_atomic, write_bytes_atomic, write_csv_atomic,
                        write_json_atomic)

__all__ = [
    "audit",
    "AuditResult",
    "SetAudit",
    "data_copying_statistic",
    "mann_whitney_u",
    "authenticity_score",
    "build_demo",
    "run_demo",
    "DemoInputs",
    "DemoResult",
    "DEFAULT_CONTROLS",
    "exit_on_gate",
    "DEMO_SETTINGS",
    "SCORES",
    "CORRELATION_SCORES",
    "FUSED_WEIGHTS",
    "ALIGN_CANDIDATES",
    "DEFAULT_HEADROOM",
    "DEFAULT_SCORE",
    "default_headroom",
    "ALIGN_HIGHPASS",
    "ALIGN_HIGHPASS_WEIGHT",
    "ALIGN_REFINE_ROUNDS",
    "ALIGN_DEFORM",
    "ALIGN_SHORTLIST",
    "BENT_FEATURE_SHARE",
    "NULL_LOW_RESOLUTION",
    "BLEND_PIXELS",
    "RANK_PIXELS",
    "score_features",
    "alignment_size",
]

logger = logging.getLogger(__name__)

DEFAULT_CONTROLS = 8
_MARKER = ".memscan_audit_incomplete"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {"train", "val", "controls", "cache"}


# ----------------------------------------------------------------------------------------------------------------
# aggregate statistics from the literature
# ----------------------------------------------------------------------------------------------------------------
def mann_whitney_u(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mann–Whitney U of ``x`` against ``y`` and its normal-approximation z score.

    ``U = #{(i, j): x_i > y_j} + ½ #{x_i = y_j}`` (equal to ``scipy.stats.mannwhitneyu(x, y).statistic``);
    ``z = (U − mn/2) / sqrt(mn(m + n + 1)/12)`` without tie correction, as Meehan et al. define Z_U.

    Args:
        x: first sample (m values).
        y: second sample (n values).

    Returns:
        (U, z).

    Raises:
        ValueError: when either sample is empty.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("both samples must be non-empty")
    from memscan.scoring import rank_rows

    ranks = rank_rows(np.concatenate([x, y]))
    u = float(ranks[:m].sum() - m * (m + 1) / 2.0)
    z = (u - m * n / 2.0) / math.sqrt(m * n * (m + n + 1) / 12.0)
    return u, z


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Centre and L2-normalise rows: Euclidean distance² between rows becomes 2 − 2·Pearson correlation."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def data_copying_statistic(
    train_emb: np.ndarray,
    val_emb: np.ndarray,
    synthetic_emb: np.ndarray,
    *,
    n_cells: int | None = None,
    min_per_cell: int = 5,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Meehan et al.'s data-copying test statistic C_T (AISTATS 2020, "A non-parametric test to detect
    data-copying in generative models").

    The embedding space is partitioned into ``n_cells`` cells by k-means on the (row-standardised) training
    embeddings. In each cell π, the distance of every validation ("test", P_n) and synthetic (Q_m) sample to its
    nearest training sample — here the correlation distance 1 − r, consistent with the rest of memscan — is
    compared with a Mann–Whitney U test, giving Z_U(π) (negative when synthetic samples sit closer to the training
    data than real held-out images do). ``C_T = Σ_π P_n(π) Z_U(π) / Σ_π P_n(π)`` over the cells holding at least
    ``min_per_cell`` validation and synthetic samples (Meehan et al. drop cells with too few generated samples).
    C_T ≪ 0 (e.g. below −3) indicates data copying; C_T ≫ 0 indicates the model under-fits.

    Args:
        train_emb: N×D training embeddings.
        val_emb: M×D held-out real embeddings.
        synthetic_emb: S×D synthetic embeddings.
        n_cells: k-means cells; default ``min(10, max(1, min(N, M, S) // 20))``.
        min_per_cell: minimum validation and synthetic samples for a cell to count.
        seed: k-means seed.
        device: device for the nearest-neighbour search.

    Returns:
        ``{"data_copying_ct", "ct_cells", "ct_cells_used", "ct_z_per_cell", "ct_weight_per_cell"}``;
        ``data_copying_ct`` is NaN when no cell qualifies.
    """
    from sklearn.cluster import KMeans

    from memscan.metrics import topk_correlation

    train = _unit_rows(train_emb)
    val = _unit_rows(val_emb)
    syn = _unit_rows(synthetic_emb)
    if n_cells is None:
        n_cells = min(10, max(1, min(len(train), len(val), len(syn)) // 20))
    n_cells = int(max(1, min(n_cells, len(train))))
    d_val = 1.0 - topk_correlation(val_emb, train_emb, 1, device=device)[0][:, 0]
    d_syn = 1.0 - topk_correlation(synthetic_emb, train_emb, 1, device=device)[0][:, 0]
    if n_cells == 1:
        cell_val, cell_syn = np.zeros(len(val), int), np.zeros(len(syn), int)
    else:
        km = KMeans(n_clusters=n_cells, n_init=4, random_state=seed).fit(train)
        cell_val, cell_syn = km.predict(val), km.predict(syn)
    zs, weights = [], []
    for cell in range(n_cells):
        dv, ds = d_val[cell_val == cell], d_syn[cell_syn == cell]
        if len(dv) < min_per_cell or len(ds) < min_per_cell:
            zs.append(float("nan"))
            weights.append(0.0)
            continue
        zs.append(mann_whitney_u(ds, dv)[1])
        weights.append(len(dv) / len(val))
    w = np.asarray(weights)
    used = w > 0
    ct = float(np.sum(w[used] * np.asarray(zs)[used]) / w[used].sum()) if used.any() else float("nan")
    return {"data_copying_ct": ct, "ct_cells": n_cells, "ct_cells_used": int(used.sum()),
            "ct_z_per_cell": zs, "ct_weight_per_cell": weights}


def authenticity_score(
    train_emb: np.ndarray,
    synthetic_emb: np.ndarray,
    *,
    best_train_index: np.ndarray | None = None,
    best_train_correlation: np.ndarray | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Authenticity score after Alaa et al. (ICML 2022, "How faithful is your synthetic data?").

    memscan's exact definition, in correlation terms: a synthetic sample x̃ with nearest training sample x (highest
    Pearson correlation r(x̃, x)) is *unauthentic* when ``r(x̃, x) > r(x, x')``, where x' is x's nearest *other*
    training sample (x itself excluded, the same patient's other images allowed) — x̃ is closer to x than any real
    training image is. ``authenticity = 1 − share of unauthentic synthetic samples`` (1: every sample authentic).
    Alaa et al. use Euclidean distances in their embedding and a per-sample classifier; this is the same
    nearest-neighbour comparison on memscan's similarity.

    Args:
        train_emb: N×D training embeddings (N ≥ 2).
        synthetic_emb: S×D synthetic embeddings.
        best_train_index, best_train_correlation: each synthetic sample's nearest training sample and correlation
            when already known (from :func:`memscan.metrics.match`); computed otherwise.
        device: device for the search.

    Returns:
        ``{"authenticity": float, "n_unauthentic": int, "unauthentic": bool array}`` (NaN with fewer than 2
        training samples).
    """
    from memscan.metrics import topk_correlation

    n_train = len(train_emb)
    if n_train < 2:
        return {"authenticity": float("nan"), "n_unauthentic": 0, "unauthentic": np.zeros(len(synthetic_emb), bool)}
    if best_train_index is None or best_train_correlation is None:
        values, indices = topk_correlation(synthetic_emb, train_emb, 1, device=device)
        best_train_correlation, best_train_index = values[:, 0], indices[:, 0]
    ids = np.arange(n_train)
    nn_other = topk_correlation(train_emb, train_emb, 1, query_groups=ids, reference_groups=ids, device=device)[0][:, 0]
    unauthentic = np.asarray(best_train_correlation) > nn_other[np.asarray(best_train_index, dtype=np.int64)]
    return {"authenticity": float(1.0 - unauthentic.mean()), "n_unauthentic": int(unauthentic.sum()),
            "unauthentic": unauthentic}


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SetAudit:
    """The audit of one synthetic set.

    Attributes:
        name: the set's name.
        match: the :class:`memscan.metrics.MatchResult` (controls excluded).
        block: the set's summary block (written under ``summary.json["synthetic_sets"][name]``).
        synthetic_table: per synthetic image: its file, best training match (file, correlation), copy flag.
        train_table: per training image: its file, subject, best synthetic match, memorized flag.
    """

    name: str
    match: Any
    block: dict[str, Any]
    synthetic_table: pd.DataFrame
    train_table: pd.DataFrame


@dataclass
class AuditResult:
    """What :func:`audit` produced.

    Attributes:
        out_dir: the output folder.
        summary: the content of ``summary.json``.
        sets: synthetic set name → :class:`SetAudit`.
        report_path: ``out_dir/report.html``.
        checkpoint: the encoder checkpoint used.
        gate_failed: True when ``fail_above`` was given and a set's copy fraction exceeds it.
        exported: synthetic set name → files written by ``export_clean``.
        warnings: every warning raised during the audit.
    """

    out_dir: Path
    summary: dict[str, Any]
    sets: dict[str, SetAudit]
    report_path: Path
    checkpoint: Path
    gate_failed: bool = False
    exported: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        """τ (shared by every synthetic set)."""
        return float(self.summary["threshold"])


# ----------------------------------------------------------------------------------------------------------------
# small I/O helpers (atomic writes)
# ----------------------------------------------------------------------------------------------------------------
def _file_list_hash(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(str(p) for p in paths).encode("utf-8")).hexdigest()


def _prepare_out_dir(out: Path, overwrite: bool) -> bool:
    """Create ``out``; refuse a non-empty folder unless ``overwrite`` or it holds an interrupted audit.

    Returns:
        True when an interrupted audit is resumed.
    """
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    resumed = False
    if out.is_dir() and any(out.iterdir()):
        resumed = (out / _MARKER).is_file()
        if not resumed and not overwrite:
            raise InputError(out, "output folder is not empty; choose another one or pass --overwrite "
                                  "(overwrite=True) to replace its audit")
        for stale in ("figures",):  # outputs a new audit fully rewrites; the embedding cache is kept
            shutil.rmtree(out / stale, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / _MARKER).write_text("an audit is running or was interrupted here; rerun it to resume\n")
    except OSError as err:
        raise InputError(out, f"cannot write to the output folder ({err.strerror or err})") from err
    return resumed


# ----------------------------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------------------------
def _synthetic_sources(synthetic: Any) -> dict[str, Any]:
    """Normalise ``synthetic`` to an ordered ``name -> source`` dict with safe, unique names."""
    if isinstance(synthetic, Mapping):
        items = list(synthetic.items())
    elif isinstance(synthetic, (str, os.PathLike)) or hasattr(synthetic, "records"):
        items = [(None, synthetic)]
    else:
        items = [(None, s) for s in synthetic]
    if not items:
        raise InputError("synthetic", "no synthetic set given")
    out: dict[str, Any] = {}
    for k, (name, source) in enumerate(items):
        if name is None:
            name = getattr(source, "name", None) if hasattr(source, "records") else Path(str(source)).stem
            name = re.sub(r"[^A-Za-z0-9._-]", "_", str(name or f"synthetic{k + 1}")) or f"synthetic{k + 1}"
            if name in out or name in _RESERVED:
                name = f"synthetic{k + 1}"
        name = str(name)
        if not _NAME_RE.match(name) or name in _RESERVED:
            raise InputError("synthetic name", f"{name!r} is not a usable set name (letters, digits, '.', '_', '-'; "
                                               f"not {', '.join(sorted(_RESERVED))})")
        if name in out:
            raise InputError("synthetic name", f"{name!r} is given twice")
        out[name] = source
    return out


def _load_set(source: Any, name: str, *, layout: str, subject_regex: str | None, strict: bool,
              spatial_dims: int | None) -> Any:
    from memscan.data import load_image_set

    if hasattr(source, "records") and hasattr(source, "skipped"):
        return source  # an ImageSet already loaded by the caller
    if source is None or str(source) == "":
        raise InputError(name, "no source given")
    return load_image_set(source, name, layout=layout, subject_regex=subject_regex, strict=strict,
                          spatial_dims=spatial_dims)


def _resolve_bundle(bundle: str | os.PathLike[str] | None, spatial_dims: int) -> Path | None:
    if bundle is None:
        return None
    path = Path(bundle).expanduser()
    if not path.is_dir():
        from memscan.training import BUNDLES, bundle_dir

        by_name = {v: k for k, v in BUNDLES.items()}
        if str(bundle) in by_name:
            return bundle_dir(by_name[str(bundle)])
        raise InputError(bundle, "bundle folder not found")
    if not (path / "configs").is_dir():
        raise InputError(path, "not a MONAI bundle (no configs/ folder)")
    return path


def _bundle_settings(bundle: Path | None, spatial_dims: int) -> dict[str, Any]:
    """Encoder and preprocessing settings: the bundle's top-level config ids, else memscan's default preset."""
    from memscan.training import preset

    settings = dict(preset("default", spatial_dims))
    if bundle is not None:
        from monai.bundle import ConfigParser

        for name in ("train.json", "inference.json"):
            cfg = bundle / "configs" / name
            if cfg.is_file():
                parser = ConfigParser()
                parser.read_config(str(cfg))
                for key in list(settings):
                    if key in parser.config and not str(parser.config[key]).startswith(("$", "@", "%")):
                        settings[key] = parser.config[key]
                break
    return settings


def _sidecar_settings(checkpoint: Path, spatial_dims: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder and preprocessing settings from ``encoder.json`` beside a checkpoint
    (:func:`memscan.training.read_encoder_settings`), limited to the keys of ``settings``; ``{}`` without one."""
    from memscan.training import read_encoder_settings

    saved = read_encoder_settings(checkpoint)
    if "spatial_dims" in saved and int(saved["spatial_dims"]) != int(spatial_dims):
        raise InputError(checkpoint, f"the encoder was trained on {saved['spatial_dims']}D images, the inputs are "
                                     f"{spatial_dims}D")
    return {k: v for k, v in saved.items() if k in settings}


def _preprocess_config(spatial_dims: int, settings: Mapping[str, Any]) -> Any:
    from memscan.data import PreprocessConfig
    from memscan.training import as_spatial_size

    return PreprocessConfig(spatial_dims=spatial_dims, spatial_size=as_spatial_size(settings["image_size"],
                                                                                    spatial_dims))


def _controls_transform(preprocess: Any, spatial_size: Sequence[int], seed: int) -> Any:
    """Preprocessing followed by a small seeded perturbation (the positive controls): a shift of up to one voxel
    per axis (with resampling), ±3% intensity scaling and Gaussian noise of 1% of the intensity range — the kind
    of near-duplicate a memorizing generator produces."""
    from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd

    perturb = Compose([
        RandAffined(keys="image", prob=1.0, padding_mode="border", translate_range=[1.0] * len(spatial_size)),
        RandScaleIntensityd(keys="image", factors=0.03, prob=1.0),
        RandGaussianNoised(keys="image", prob=1.0, mean=0.0, std=0.01),
    ])
    perturb.set_random_state(seed=seed)
    return Compose([getattr(preprocess, "compose", preprocess), perturb])


#: Score modes: ``"embedding"`` (Dar et al.'s score), ``"fused"`` (flip-invariant pixel + embedding features),
#: ``"aligned"`` (fused features, then each query's top candidates re-scored after test-time alignment) or
#: ``"best-of"`` (per pair, the better of the fused score and pixel Pearson, each scaled by its own null) or
#: ``"best-of-aligned"`` (the best of six, each scaled by its own null: pixel Pearson at two sizes, the full-size one
#: with the best blend of two training images, :data:`BLEND_PIXELS`; the full-size pixels' Spearman correlation,
#: :data:`RANK_PIXELS`; the aligned high-passed pixel correlation of the
#: fused features' top candidates; the same candidates bent onto the query by a smooth field, :data:`ALIGN_DEFORM`;
#: and those bent pairs' fused score mixed with their bent one, :data:`BENT_FEATURE_SHARE` (the fused score in 3D)).
SCORES = ("embedding", "fused", "aligned", "best-of", "best-of-aligned")
#: The score modes whose values are Pearson correlations (the aligned and best-of scores are not).
CORRELATION_SCORES = ("embedding", "fused")
#: Candidates per query that ``score="aligned"`` aligns and re-scores.
ALIGN_CANDIDATES = 5
#: ``score="best-of-aligned"``: σ in pixels at its :func:`alignment_size` of the in-plane Gaussian blur subtracted
#: before its alignment (``align_and_correlate(highpass=...)``), so a new patient's image does not line up with a
#: training image by the outline every patient shares. 2 at the full size keeps the band of section 7's best, σ 1 at
#: half size (docs/benchmarks/detection_candidates.md sections 7 and 8; σ 1 at the full size raised false alarms).
ALIGN_HIGHPASS = 2.0
#: The high-passed pixels' share of that aligned pixel score (``align_and_correlate(highpass_weight=...)``; the rest
#: would be plain pixels). 1: shares ½ and ¼ measured no better on the benchmark and on the DDPM audit, and raised
#: the false alarms on new patients (detection_candidates.md section 7).
ALIGN_HIGHPASS_WEIGHT = 1.0
#: ``score="best-of-aligned"``: coarse-to-fine rounds of its alignment's rotation and zoom
#: (``align_and_correlate(refine_rounds=...)``): 2 lifted zoomed copies' recall at the default headroom from 0.82 to
#: 0.93 (MRI 2D) and 0.78 to 0.92 (CT) at the same false alarms (docs/benchmarks/detection_candidates.md section 11).
ALIGN_REFINE_ROUNDS = 2
#: ``score="best-of-aligned"``, per spatial dimensionality: how deep its retrieval looks for the candidates it aligns
#: (``aligned_search(shortlist=...)``, :func:`memscan.scoring.shortlist_candidates`), or None: only the fused
#: features' :data:`ALIGN_CANDIDATES` best. 2D: the top ``depth``; the first :data:`ALIGN_CANDIDATES` stay and the
#: ``extra`` of the rest that a quick alignment (zoom and shift only, at half the alignment's size, σ ``highpass`` px)
#: scores highest are aligned too. A copy cropped and enlarged by a quarter sat up to 22 places down its source's
#: list, behind slices its enlarged outline resembles (aligned to its source: r 0.99); crop/resize AUROC / recall
#: 0.981 / 0.97 → 1.000 / 1.00 (MRI 2D) and 0.995 / 0.97 → 1.000 / 0.99 (CT) on the detection benchmark, nothing else
#: moved (docs/benchmarks/detection_candidates.md section 22). The non-rigid fit still bends only the first
#: :data:`ALIGN_CANDIDATES` (the added ones would push stretched copies' sources out of its top five). 3D: None (its
#: crop/resize copies are all caught: 1.000 / 1.00).
ALIGN_SHORTLIST: dict[int, dict[str, Any] | None] = {
    2: {"depth": 20, "extra": 3, "factor": 2, "highpass": 1.0},
    3: None,
}
#: ``score="best-of-aligned"``: settings of its non-rigid fit (:func:`memscan.scoring.deform_and_correlate`, at
#: :func:`alignment_size`) per spatial dimensionality, or None for none. The ``k`` candidates the rigid alignment
#: scored highest are bent onto each query by a smooth field, fitted coarse-to-fine on high-passed pixels and scored
#: on σ 1 px detail less the edge band the field can reach (``margin``'s default: what a warp pulls in from beyond the
#: edge matches nothing): one more score set on its own null, for copies a generator reproduced locally stretched.
#: Each candidate is bent first and high-passed after, as a stretched copy's detail was taken after its warp (round
#: 22: CT elastic recall 0.81 → 0.90, MRI 3D elastic AUROC 0.988 → 0.994; section 20). 2D
#: (control points 6 px apart, each ≤ 3 px, σ 4 then 2 px, 5 candidates): elastic recall at the default headroom
#: 0.89 → 0.98 on MRI (CT 0.82 → 0.87) at the same false alarms; leaving the edge band out took CXR, whose
#: radiographs fill the frame, from 0.54 to 1.00. 3D (4 voxels apart, each ≤ 3, σ 2 then 1, 60 steps each, only the
#: candidate the alignment scored highest: the benchmark's 3D warp is finer; a 3-voxel edge band, the field's reach,
#: so a 12-slice slab keeps 6 slices scored): elastic recall 0.78 → 0.86 (rounds 19-20, ≤ 2 voxels, 30 steps), and
#: round 23's reach and steps 0.89 → 0.93 in a per-part replay (AUROC 0.992 → 0.997, false alarms 0.03 → 0.02); the
#: 3D match at 32³ takes 1.91× its rigid parts' time, 1.63× before (docs/benchmarks/scores_3d.txt; detection.md,
#: detection_candidates.md sections 14, 17, 18, 21). Since round 26 the 3D fit climbs by L-BFGS, each pair with its
#: own curvature and line search, on a field cubic between its control points (Adam and a trilinear field left a
#: strong 3D warp, bent by its true source, at a median r 0.96; 0.98 now): MRI 3D elastic recall 0.93 → 0.98 in a
#: per-part replay at the same false alarms on that family (section 24). Since round 27 the 2D fit reaches 5 px from
#: a σ 8 px first stage and climbs by the same L-BFGS, 40 steps per stage, no parameter moving more than 0.3 in one
#: step (unbounded, a long step left weakly warped copies where the tanh saturates, r 0.89–0.92 where Adam reached
#: 0.94–0.99): CT elastic recall 0.91 → 0.94 and CXR 0.98 → 1.00 in a per-part replay, no false alarm added
#: (section 25). Since round 28 the 2D fit also bends the ``band_k`` of the retrieval's candidates whose band-passed
#: pixels (σ 2 blur less σ 8 blur, ``band``) correlate best with the query, where the rigid five lack them
#: (:func:`memscan.scoring.bend_candidates`): a strongly warped copy's source had fallen out of the rigid five behind
#: its neighbouring slices (CT: 0.87 of the strong copies kept it; the band's top three added 0.97–1.00): CT elastic
#: recall 0.94 → 0.96 in a per-part replay at the same false alarms (section 26).
ALIGN_DEFORM: dict[int, dict[str, Any] | None] = {
    2: {"spacing": 6.0, "max_displacement": 5.0, "fit_highpass": (8.0, 4.0, 2.0), "iterations": 40,
        "optimizer": "lbfgs", "max_step": 0.3, "highpass": 1.0, "k": 5, "band_k": 3, "band": (2.0, 8.0)},
    3: {"spacing": 4.0, "max_displacement": 3.0, "margin": 3, "fit_highpass": (2.0, 1.0), "iterations": 60,
        "optimizer": "lbfgs", "highpass": 1.0, "k": 1},
}
#: ``score="best-of-aligned"``, per spatial dimensionality: the fused features count only where the non-rigid fit
#: confirms them. Each candidate it bent scores ``share`` × its fused-feature correlation + (1 − share) × its
#: bent-pixel score, the best per query, as one more part on its own null, in place of the fused features' own
#: correlation (None: that correlation, as before round 21). The encoder is trained to ignore what a generator
#: changes, elastic warps included, so it keeps stretched copies that the pixels alone lose; but trained on few
#: images it also takes a new patient for a training one, and such a pair cannot be bent onto each other. 2D (0.7):
#: on the detection benchmark the chest X-rays' false alarms on a new patient 0.056 → 0.000 (CXR meets the goal on 9
#: of 9 families instead of 2), at elastic recall 0.87 → 0.81 on CT and 0.98 → 0.96 on MRI (still 9 of 9) and no
#: extra fit (detection.md). 3D: None; its fit, one candidate under a field too coarse for the benchmark's 3D
#: warp, confirmed too few stretched copies before round 22's fit (MRI 3D elastic recall 0.86 → 0.78 at 0.5, its
#: false alarms already ≤ 0.04 per family), and with round 23's fit (two candidates) still 0.94 → 0.89, for
#: contrast's tie-break (docs/benchmarks/detection_candidates.md sections 19 and 21).
BENT_FEATURE_SHARE: dict[int, float | None] = {2: 0.7, 3: None}
#: ``score="best-of-aligned"``: zooms at which the null of its plain pixel parts (Pearson at two sizes, and the ranks of
#: :data:`RANK_PIXELS`) also takes the validation images, down-sampled to that share of their size per axis and back
#: (:func:`memscan.data.transforms.low_resolution`; the two ends of the training presets' ``lowres`` view,
#: :data:`~memscan.data.transforms.LOWRES_ZOOM_RANGE`). A new patient's image rendered with less detail loses the fine
#: structure that correlated with nothing, so its plain Pearson with every training image rises while a null of sharp
#: validation images stays put; the null then holds the validation patients as a generator might render them
#: (``match(null_views=...)``). The fused, aligned and non-rigid parts keep their own nulls (calibrating the fused part
#: too cost elastic copies). MRI 3D detail-loss false alarms on a new subject 0.12 → 0.04 and overall 0.04 → 0.02 (MRI
#: 2D 0.02 → 0.01), for one MRI 2D mixture and one CXR elastic copy (docs/benchmarks/detection.md,
#: detection_candidates.md sections 13 and 15).
NULL_LOW_RESOLUTION: tuple[float, ...] = (0.6, 0.25)
#: ``score="best-of-aligned"``: its full-size pixel Pearson scores each image by its best non-negative blend of two
#: reference images (:func:`memscan.metrics.blend_correlation`, ``match(blend=[0])``), calibrated alike on blends of
#: two validation images. A generator that memorised two training images can superimpose them; each source alone
#: then correlates only partly with the sample. Mixtures' recall at the default headroom 0.95 → 1.00 (MRI 2D), 0.97 →
#: 1.00 (CXR) at the same false alarms (docs/benchmarks/detection_candidates.md section 16). Two searches of the pixels
#: per direction instead of one: the plain sets' match takes about 6× as long (17 s against 3 s for 2500 64² images
#: per set on 2 CPU cores, docs/benchmarks/metrics_blend.txt), small beside the alignment's time.
BLEND_PIXELS = True
#: ``score="best-of-aligned"``: its full-size pixels are also scored on their ranks, as one more part on its own null
#: (Spearman's correlation: each image's pixel values replaced by their ranks within it, :func:`memscan.scoring.
#: rank_rows`). A generator can reproduce a memorised image under another intensity curve (gamma, windowing); the
#: ranks of a copy's pixels are its source's whatever the increasing curve, so it scores as an exact copy, while
#: Pearson loses the copies the strongest curves bend. Its null takes the low-resolution views of the Pearson parts
#: (:data:`NULL_LOW_RESOLUTION`; without them MRI 3D detail-loss false alarms 0.04 → 0.10). On the detection
#: benchmark MRI 3D contrast AUROC 0.9992 → 1.0000 (the tie with pixel Pearson settled), at CXR elastic recall 1.00
#: → 0.98 (one copy: a 5-image null's 95th percentile rises with one more part); nothing else moved. The match's
#: time is unchanged within run-to-run noise (docs/benchmarks/scores.txt, scores_3d.txt; detection_candidates.md
#: section 23).
RANK_PIXELS = True
#: Weights of the fused score's blocks (pixels at a quarter of the input size, the encoder's embedding).
FUSED_WEIGHTS = {"pixel": 1.0, "embedding": 2.0}
#: The audit's score when none is given: the detection benchmark's best on every case and seed, and, with its
#: headroom, the only one catching more copies than ``"fused"`` at fewer false alarms on a new patient
#: (docs/benchmarks/detection_candidates.md section 10, detection.md).
DEFAULT_SCORE = "best-of-aligned"
#: Threshold headroom per score when none is given (0 elsewhere, the paper's rule): ``best-of-aligned`` at 0.5
#: flagged 0.00-0.09 of a new patient's images instead of 0.13-0.45 at τ, keeping recall 0.86-0.96; the fused score
#: at 0.5 lost a quarter of the copies, so it keeps τ (detection_candidates.md section 10).
DEFAULT_HEADROOM: dict[str, float] = {"best-of-aligned": 0.5}


def default_headroom(score: str) -> float:
    """The headroom the audit uses with ``score`` when none is given (:data:`DEFAULT_HEADROOM`, else 0)."""
    return DEFAULT_HEADROOM.get(score, 0.0)


#: Largest pixel grid per axis of ``score="best-of"``'s pixel Pearson (by dimensionality): the detection
#: benchmark's image sizes, where the score was measured (docs/benchmarks/detection_candidates.md).
BEST_OF_PIXEL_CAP = {2: 64, 3: 32}


def best_of_pixel_size(image_size: Sequence[int]) -> list[int]:
    """Spatial size of ``score="best-of"``'s pixel features: the input, area-downsampled to at most
    :data:`BEST_OF_PIXEL_CAP` voxels per axis."""
    cap = BEST_OF_PIXEL_CAP[2 if len(image_size) == 2 else 3]
    return [max(1, min(int(n), cap)) for n in image_size]


def best_of_pixel_sizes(image_size: Sequence[int], score: str) -> list[list[int]]:
    """Spatial sizes of a score's pixel Pearson sets: ``"best-of"`` has one, :func:`best_of_pixel_size`;
    ``"best-of-aligned"`` adds that grid at a quarter per axis (16² / 8³ at most), where detail loss and elastic
    warps leave a copy's coarse image intact (docs/benchmarks/detection_candidates.md section 9); other scores none."""
    if score not in ("best-of", "best-of-aligned"):
        return []
    full = best_of_pixel_size(image_size)
    return [full] if score == "best-of" else [full, [max(1, n // 4) for n in full]]


class _SetFeatures(NamedTuple):
    """What :func:`_score_features` computes for one set."""

    features: np.ndarray  # the matched features (embedding or fused)
    aligned: np.ndarray | None  # score="aligned" / "best-of-aligned": the coarse images it aligns
    pixels: list[np.ndarray]  # score="best-of" / "best-of-aligned": the pixel feature sets beside the fused ones


def score_features(network: Any, records: Sequence[Mapping[str, Any]], preprocess: Any, *, score: str = "embedding",
                   image_size: Sequence[int], batch_size: int = 16, device: str = "auto",
                   cache_dir: str | os.PathLike[str] | None = None,
                   checkpoint_sha256: str | None = None, precision: str = "auto") -> np.ndarray:
    """The features :func:`memscan.metrics.match` compares for one set: the embedding, or the fused score.

    ``"fused"`` is :mod:`memscan.scoring`'s construction (the detection benchmark's best recipe): for an image and
    its left-right mirror (MONAI ``Flipd`` on the first spatial axis), pixels area-downsampled to ``image_size // 4``
    (weight 1) fused with the embedding (weight 2) by :func:`~memscan.scoring.fuse_features`; the two standardised
    rows are averaged, as :func:`~memscan.scoring.flip_invariant_features` does, so an image and its mirror copy get
    the same row. Embeddings go through :func:`memscan.embed.embed_images` (the mirrored ones cached under their own
    preprocessing fingerprint); each image is preprocessed once more for its pixels, which are never cached.

    Args:
        network: the encoder (eval mode).
        records: ``{"image": path or array}`` records.
        preprocess: deterministic preprocessing on key ``"image"``.
        score: one of :data:`SCORES`.
        image_size: spatial size after preprocessing.
        batch_size, device, cache_dir, checkpoint_sha256, precision: passed to ``embed_images``.

    Returns:
        ``float32`` N×D features (D = the embedding size, or ``prod(image_size // 4) + embedding size``).

    Raises:
        InputError: an unknown ``score``, or a constant image (its pixel correlation is undefined).
    """
    return _score_features(network, records, preprocess, score=score, image_size=image_size, batch_size=batch_size,
                           device=device, cache_dir=cache_dir, checkpoint_sha256=checkpoint_sha256,
                           precision=precision).features


def _score_features(network: Any, records: Sequence[Mapping[str, Any]], preprocess: Any, *, score: str,
                    image_size: Sequence[int], batch_size: int, device: str, cache_dir: str | os.PathLike[str] | None,
                    checkpoint_sha256: str | None, precision: str) -> _SetFeatures:
    """:func:`score_features` and, for ``score="aligned"`` / ``"best-of-aligned"``, the images it aligns
    (``[N, C, *alignment_size]``) and, for ``score="best-of"`` / ``"best-of-aligned"``, the pixel features at
    :func:`best_of_pixel_size`, taken from the same preprocessed batches as the fused pixels."""
    from memscan.embed import embed_images, embed_mirrored
    from memscan.scoring import fuse_features, standardize_rows

    if score not in SCORES:
        raise InputError("score", f"must be one of {', '.join(SCORES)}, got {score!r}")

    if score == "embedding":
        return _SetFeatures(np.asarray(embed_images(network, records, preprocess, batch_size=batch_size, device=device,
                                                    cache_dir=cache_dir, checkpoint_sha256=checkpoint_sha256,
                                                    precision=precision), np.float32), None, [])
    # "fused", "aligned" and "best-of" match the same features ("aligned" then re-scores candidates on the aligned
    # images, "best-of" also matches pixels); one pass decodes each file once for the embeddings of the image and
    # its mirror (Flipd's spatial axis 0) and the coarse pixels of both
    coarse = [max(1, int(n) // 4) for n in image_size]
    align = alignment_size(image_size, score) if score in ("aligned", "best-of-aligned") else None
    best = best_of_pixel_sizes(image_size, score)
    # a best-of grid equal to the fused pixels' is taken from them, not downsampled again
    extra = ([] if align is None else [align]) + [size for size in best if size != coarse]
    # best-of-aligned aligns its pixel Pearson's own full-size pixels: one array for both
    extra = [size for k, size in enumerate(extra) if size not in extra[:k]]
    # the aligned and best-of pixels need no mirror image: the alignment mirrors itself, best-of is not mirrored
    feats = embed_mirrored(network, records, preprocess, mirror_axis=0, pixel_sizes=[coarse],
                           plain_pixel_sizes=extra, batch_size=batch_size,
                           device=device, cache_dir=cache_dir, checkpoint_sha256=checkpoint_sha256,
                           precision=precision)
    (pixels, mirrored), aligned = feats.pixels[0], None
    if align is not None:
        plain_small = feats.plain_pixels[extra.index(align)]
        aligned = plain_small.reshape(len(plain_small), -1, *align)
    # standardised rows, like every block of the fused features
    plain = _pixel_sets([pixels if size == coarse else feats.plain_pixels[extra.index(size)] for size in best], score)
    total = None
    for pix, emb in ((pixels, feats.embedding), (mirrored, feats.mirrored)):
        part = standardize_rows(fuse_features({"pixel": pix, "embedding": emb}, FUSED_WEIGHTS), "features")
        total = part if total is None else total + part
    return _SetFeatures((total / 2).astype(np.float32), aligned, plain)


def _ranks_pixels(score: str) -> bool:
    """Whether ``score`` also correlates its full-size pixels' ranks (:data:`RANK_PIXELS`: ``"best-of-aligned"``)."""
    return bool(RANK_PIXELS) and score == "best-of-aligned"


def _pixel_sets(pixels: Sequence[np.ndarray], score: str) -> list[np.ndarray]:
    """A score's pixel sets from its raw pixel rows at :func:`best_of_pixel_sizes`: each standardised (dot products
    are Pearson correlations) and, for ``"best-of-aligned"`` with :data:`RANK_PIXELS`, the first (full-size) one's
    ranks within each row, standardised (dot products are Spearman correlations), last."""
    from memscan.scoring import rank_rows, standardize_rows

    sets = [standardize_rows(rows, "pixels") for rows in pixels]
    if sets and _ranks_pixels(score):
        sets.append(standardize_rows(rank_rows(pixels[0]), "pixels"))
    return sets


def alignment_size(image_size: Sequence[int], score: str = "aligned") -> list[int]:
    """Spatial size at which a score aligns images.

    ``"aligned"``: half the input per axis, at most 32 (2D) or 16 (3D) voxels (the detection benchmark's setting:
    coarse enough to ignore detail a generator does not reproduce). ``"best-of-aligned"``: the grid of its pixel
    Pearson, :func:`best_of_pixel_size` (the input, at most 64² / 32³): its high-passed pixels keep only fine detail,
    which re-aligns crop-resized and moved copies better at the benchmark's full size than at half
    (docs/benchmarks/detection_candidates.md section 8).
    """
    if score == "best-of-aligned":
        return best_of_pixel_size(image_size)
    cap = 32 if len(image_size) == 2 else 16
    return [max(4, min(int(n) // 2, cap)) for n in image_size]


def _alignment(cfg: Any) -> dict[str, Any]:
    """``align_and_correlate`` axes from the preprocessing: the left-right mirror (``flip_axis``) and, in 3D, the
    plane perpendicular to ``rotate_axis``."""
    dims = int(cfg.spatial_dims)
    plane = (-2, -1) if dims == 2 else tuple(a - dims for a in range(3) if a != int(cfg.rotate_axis))
    return {"flip_axes": (int(cfg.flip_axis) - dims,), "plane": plane}


def _score_align_axes(score: str, axes: Mapping[str, Any], spatial_dims: int) -> dict[str, Any]:
    """:func:`_aligned_refine` arguments of a score's alignment: ``axes`` (:func:`_alignment`) as they are for
    ``"aligned"``; for ``"best-of-aligned"`` the aligned pixels alone (the fused features are one of its other sets),
    high-passed (:data:`ALIGN_HIGHPASS`, :data:`ALIGN_HIGHPASS_WEIGHT`), with :data:`ALIGN_REFINE_ROUNDS` rounds of
    coarse-to-fine rotation and zoom, the retrieval depth of :data:`ALIGN_SHORTLIST` and the non-rigid fit of
    :data:`ALIGN_DEFORM` for ``spatial_dims``."""
    if score != "best-of-aligned":
        return dict(axes)
    deform, share = ALIGN_DEFORM[int(spatial_dims)], BENT_FEATURE_SHARE[int(spatial_dims)]
    shortlist = ALIGN_SHORTLIST[int(spatial_dims)]
    if deform and share is not None:
        deform = {**deform, "feature_share": share}
    return {**axes, "weights": {"pixel": 1.0, "features": 0.0}, "highpass": ALIGN_HIGHPASS,
            "highpass_weight": ALIGN_HIGHPASS_WEIGHT, "refine_rounds": ALIGN_REFINE_ROUNDS,
            **({"deform": dict(deform)} if deform else {}), **({"shortlist": dict(shortlist)} if shortlist else {})}


def _retrieval_depth(align_axes: Mapping[str, Any]) -> int:
    """Candidates per query the retrieval hands to a score's alignment: :data:`ALIGN_CANDIDATES`, or its shortlist's
    ``depth`` (:data:`ALIGN_SHORTLIST`)."""
    from memscan.scoring import shortlist_depth

    return shortlist_depth(ALIGN_CANDIDATES, align_axes.get("shortlist"))


def _aligned_refine(images: Mapping[str, np.ndarray], axes: Mapping[str, Any],
                    memo: dict[tuple, tuple[np.ndarray, np.ndarray]] | None = None) -> Any:
    """A :data:`memscan.metrics.Refine` that aligns each query's candidates
    (:func:`memscan.scoring.align_and_correlate`) and fuses the aligned pixels with their feature correlation.

    ``memo``, shared by the refines of several synthetic sets, keeps the searches that involve no synthetic image
    (train → validation: τ and the null split), so an audit of several sets aligns its calibration pairs once.
    With a ``deform`` entry in ``axes`` (:func:`memscan.scoring.deform_and_correlate` settings, and ``k``: only the
    k candidates the alignment scored highest) the same candidates are also bent onto their query, and the refine
    returns both scores per query (``[n, 2]``: two score sets of :func:`memscan.metrics.match`):
    ``"best-of-aligned"`` (:data:`ALIGN_DEFORM`). With a ``shortlist`` entry (:data:`ALIGN_SHORTLIST`, and ``keep``:
    default :data:`ALIGN_CANDIDATES`) the candidates are narrowed first (:func:`memscan.scoring.shortlist_candidates`)
    and the fit bends among the first ``keep`` only. With ``band_k`` (and ``band``) in ``deform`` the fit also bends
    that many of all the candidates the refine was given, the best by band-passed pixels
    (:func:`memscan.scoring.bend_candidates`), where the first ``k`` lack them. With ``feature_share`` in ``deform``
    (:data:`BENT_FEATURE_SHARE`) a third: each bent candidate's feature correlation (the refine's ``values``) and bent
    score, mixed in that share, the best per query (``[n, 3]``)."""
    from memscan.scoring import (BEND_CHOICE, align_and_correlate, bend_candidates, deform_and_correlate,
                                 shortlist_arguments, shortlist_candidates)

    axes = dict(axes)
    shortlist = axes.pop("shortlist", None)
    deform, choice, share = axes.pop("deform", None), {}, None
    if deform is not None:
        deform = dict(deform)
        # which candidates it bends: the k the alignment scored highest, and the band's band_k
        choice = {key: deform.pop(key) for key in BEND_CHOICE if key in deform}
        share = deform.pop("feature_share", None)

    def refine(query: str, rows: np.ndarray, reference: str, candidates: np.ndarray,
               values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = None
        if memo is not None and "synthetic" not in (query, reference):
            key = (query, reference, *(np.ascontiguousarray(a).tobytes() for a in (rows, candidates, values)))
            if key in memo:
                return memo[key]
        keep, pool, pool_values = None, candidates, values
        if shortlist is not None:  # the retrieval's first candidates and the quick alignment's best of the rest
            keep = int(shortlist.get("keep", ALIGN_CANDIDATES))
            chosen = shortlist_candidates(images[query][rows], images[reference], candidates, keep=keep,
                                          **shortlist_arguments(shortlist, images[query], axes),
                                          device=axes.get("device", "auto"))
            candidates, values = chosen, _candidate_values(candidates, values, chosen)
        found = align_and_correlate(images[query][rows], images[reference], candidates, feature_scores=values, **axes)
        score, index = found.score, found.index
        if deform is not None:  # ranked by the rigid alignment's score, which finds a stretched copy's source best;
            # among the retrieval's own candidates (a shortlist's added ones are for zoomed copies)
            bend = bend_candidates(images[query][rows], images[reference], found.ranked(keep), pool,
                                   plane=axes.get("plane", (-2, -1)), device=axes.get("device", "auto"), **choice)
            bent = deform_and_correlate(images[query][rows], images[reference], bend,
                                        plane=axes.get("plane", (-2, -1)),
                                        device=axes.get("device", "auto"), **deform)
            scores, indices = [score, bent.score], [index, bent.index]
            if share is not None:  # the features of the pairs the fit bent, confirmed by their bent pixels
                mixed, mixed_index = _bent_feature_mix(bent, _candidate_values(pool, pool_values, bent.candidates),
                                                        share)
                scores.append(mixed)
                indices.append(mixed_index)
            score, index = np.stack(scores, axis=1), np.stack(indices, axis=1)
        if key is not None:
            memo[key] = (score, index)
        return score, index

    return refine


def _bent_feature_mix(bent: Any, features: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best bent pair (``bent``: a :class:`memscan.scoring.AlignedMatch` of the non-rigid fit) by
    ``share`` × its feature correlation (``features``, one per ``bent.candidates`` entry) + (1 − share) × its bent
    score, and that pair's reference index; ``-inf`` and -1 for a query without candidates. The audit's third refine
    column and the detection benchmark's ``feature_share`` part."""
    mixed = np.where(bent.candidates >= 0, share * features + (1 - share) * bent.pixel, -np.inf)
    rows, best = np.arange(len(mixed)), mixed.argmax(axis=1)
    return mixed[rows, best], bent.candidates[rows, best]


def _candidate_values(candidates: np.ndarray, values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``values`` (``[n, K]``, one per ``candidates`` entry) of the ``chosen`` candidates (``[n, k]``, each among its
    row's ``candidates`` or -1); ``-inf`` for -1 (no candidate)."""
    hit = (chosen[:, :, None] == candidates[:, None, :]) & (chosen[:, :, None] >= 0)
    return np.where(hit, np.asarray(values, dtype=np.float64)[:, None, :], -np.inf).max(axis=2)


def _check_args(percentile: float, controls: int, fail_above: float | None, batch_size: int,
                score: str = "embedding", headroom: float | None = 0.0) -> float:
    """One-line errors for bad arguments, before any work; returns the headroom to use (None = the score's
    :func:`default_headroom`)."""
    from memscan.metrics import _check_headroom  # the audit imports metrics right after these checks anyway

    if score not in SCORES:
        raise InputError("score", f"must be one of {', '.join(SCORES)}, got {score!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise InputError("percentile", f"must be a number in [0, 100], got {percentile!r}")
    headroom = _check_headroom(default_headroom(score) if headroom is None else headroom)
    if isinstance(controls, bool) or not isinstance(controls, (int, np.integer)) or controls < 0:
        raise InputError("controls", f"must be a non-negative integer, got {controls!r}")
    if fail_above is not None and (isinstance(fail_above, bool) or not isinstance(fail_above, (int, float))
                                   or not 0 <= fail_above <= 1):
        raise InputError("fail_above", f"must be a fraction in [0, 1], got {fail_above!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
    return headroom


def _relative_names(paths: Sequence[str]) -> list[str]:
    """File names relative to the set's common folder (used for exports and short labels)."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    if common in resolved:  # one path is the common prefix itself (a DICOM series folder)
        common = common.parent
    return [p.relative_to(common).as_posix() for p in resolved]


def _export_clean(sets: Mapping[str, SetAudit], records: Mapping[str, list[dict]], dest: Path,
                  overwrite: bool) -> dict[str, list[str]]:
    """Copy the synthetic files that are not copies to ``dest`` keeping names and formats."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise InputError(dest, "export folder is not empty; choose another one or pass --overwrite")
    exported: dict[str, list[str]] = {}
    for name, sa in sets.items():
        base = dest if len(sets) == 1 else dest / name
        paths = [r["image"] for r in records[name]]
        rel = _relative_names(paths)
        keep = ~sa.synthetic_table["copy"].to_numpy(bool)
        written = []
        for src, rel_name, ok in zip(paths, rel, keep):
            if not ok:
                continue
            target = base / rel_name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                copy_file_atomic(src, target)
            written.append(str(target))
        exported[name] = written
    return exported


def _subject_counts(train_records: Sequence[dict], memorized: np.ndarray) -> tuple[int, int]:
    subjects = np.asarray([str(r.get("subject_id", r["image"])) for r in train_records], dtype=object)
    return int(len(set(subjects[memorized]))), int(len(set(subjects)))


def _identity(data: Any) -> Any:
    """Preprocessing of records that hold already preprocessed arrays (the fused score's positive controls)."""
    return data


def _preprocessed_image(preprocess: Any, record: Mapping[str, Any]) -> np.ndarray:
    out = preprocess({"image": record["image"]})
    image = out["image"]
    return image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)


def _low_resolution_pixels(records: Sequence[Mapping[str, Any]], preprocess: Any, sizes: Sequence[Sequence[int]],
                           zooms: Sequence[float], score: str = "best-of-aligned") -> list[list[np.ndarray]]:
    """Per pixel set of ``score`` (:func:`_pixel_sets` of the grids ``sizes``), the preprocessed images at each of
    ``zooms`` of their resolution (:func:`~memscan.data.transforms.low_resolution`) as that set's rows: the null
    views of ``best-of-aligned``'s pixel parts (:data:`NULL_LOW_RESOLUTION`)."""
    import torch

    from memscan.data.transforms import low_resolution
    from memscan.scoring import area_pixels

    rows: list[list[list[np.ndarray]]] = [[[] for _ in sizes] for _ in zooms]
    for record in records:
        image = _preprocessed_image(preprocess, record)
        for z, zoom in enumerate(zooms):
            low = torch.from_numpy(low_resolution(image, zoom))[None]
            for k, size in enumerate(sizes):
                rows[z][k].append(area_pixels(low, size)[0].numpy())
    per_zoom = [_pixel_sets([np.stack(found) for found in per_size], score) for per_size in rows]
    return [list(per_set) for per_set in zip(*per_zoom)]


_METHOD = [
    "Method (Dar et al., Nat. Biomed. Eng. 2025): an encoder trained self-supervised (NT-Xent) on the training "
    "images maps every image to an embedding; similarity is the Pearson correlation of embeddings. For each "
    "training image its best correlation with a validation image (real images of other patients) is taken; τ is "
    "the p-th percentile of those values. A synthetic image whose best training correlation exceeds τ is a copy; "
    "a training image whose best synthetic correlation exceeds τ is memorized. Fractions are of the synthetic set "
    "(copies) and of the training set (memorized); a patient counts when at least one of their images is memorized.",
    "Intervals: 95% bootstrap intervals. Null rate: τ recalibrated on one half of the validation set and applied to "
    "the other half, i.e. the share of real images of new patients the threshold flags — the share of false "
    "alarms to expect from a generator that copies nothing.",
    "Positive controls: training images perturbed in memory (shift ≤1 voxel, intensity ±3%, 1% noise) are embedded "
    "like synthetic images; the share flagged shows whether the detector catches near-copies. They are left out "
    "of every other number.",
    "Data-copying C_T (Meehan et al., AISTATS 2020): k-means cells on the training embeddings; in each cell a "
    "Mann–Whitney z score compares synthetic and validation distances (1 − correlation) to their nearest training "
    "image; C_T is their validation-weighted mean. C_T well below 0 (e.g. < −3) means synthetic images sit closer "
    "to the training data than new real images do.",
    "Authenticity (after Alaa et al., ICML 2022): the share of synthetic images that are not closer to their "
    "nearest training image than that image's nearest other training image. Novel samples score about 0.5 or "
    "more; copies push the score toward 0.",
]


def _pairs(sa: SetAudit, kind: str, threshold: float, train_records: Sequence[dict], syn_records: Sequence[dict],
           preprocess: Any, train_names: Sequence[str], syn_names: Sequence[str], n: int = 8,
           value_name: str = "correlation") -> tuple[list, Any]:
    from memscan.report import PairImage, ranked_pairs

    table = ranked_pairs(sa.synthetic_table, threshold, kind=kind, n=n)
    pairs = []
    for row in table.itertuples(index=False):
        s_idx, t_idx = int(row.synthetic_index), int(row.best_train_index)
        second = int(getattr(row, "second_train_index", -1))  # a blend's other training source, -1 for none
        blended = {"second_image": _preprocessed_image(preprocess, train_records[second]),
                   "second_label": train_names[second]} if second >= 0 else {}
        pairs.append(PairImage(_preprocessed_image(preprocess, train_records[t_idx]),
                               _preprocessed_image(preprocess, syn_records[s_idx]),
                               float(row.best_train_correlation), train_names[t_idx], syn_names[s_idx], **blended))
    shown = pd.DataFrame({
        "rank": np.arange(1, len(table) + 1),
        "synthetic file": [syn_names[int(i)] for i in table["synthetic_index"]],
        "training file": [train_names[int(i)] for i in table["best_train_index"]],
        value_name: table["best_train_correlation"].to_numpy(float),
        "margin to τ": table["margin"].to_numpy(float),
    })
    if "second_train_index" in table:  # a blend of two training images: its other source too
        shown.insert(3, "blended with", [train_names[int(i)] if i >= 0 else "" for i in table["second_train_index"]])
    return pairs, shown


#: the report's words for the 2D shortlist (:data:`ALIGN_SHORTLIST`), none where there is none
_SHORTLIST_TEXT = (f"; in 2D also the {ALIGN_SHORTLIST[2]['extra']} of the next "
                   f"{ALIGN_SHORTLIST[2]['depth'] - ALIGN_CANDIDATES} that a quick alignment of zoom and shift at half "
                   "the size lines up best, for copies zoomed past what the features recognise"
                   if ALIGN_SHORTLIST[2] else "")
_SCORE_TEXT = {
    "embedding": "Score: the embedding's Pearson correlation, as in the paper (memscan --score embedding).",
    "fused": "Score (memscan --score fused, not the paper's): the correlation of flip-invariant fused features — "
             "pixels downsampled to a quarter of the input size (weight 1) and the embedding (weight 2), averaged "
             "over the image and its left-right mirror — so every correlation below, τ included, is on that score.",
    "aligned": "Score (memscan --score aligned, not the paper's): the fused features of --score fused retrieve each "
               "image's 5 nearest candidates; each candidate is then aligned to it (mirror, rotation ±12°, zoom "
               "0.8–1.25, translation up to 15%) on coarse pixels, and the pair's score is the mean of the aligned "
               "pixel correlation and the fused correlation. Every score below, τ included, is that score.",
    "best-of": "Score (memscan --score best-of, not the paper's): per pair, the better of the --score fused "
               "correlation and the pixel correlation (pixels at most 64 per axis in 2D, 32 in 3D), each rescaled "
               "as (r − τ_b) / (1 − τ_b) with its own threshold τ_b, so 0 is that score's threshold and 1 an exact "
               "copy. Every score below, τ included, is on that scale, not a correlation.",
    "best-of-aligned": "Score (memscan --score best-of-aligned, not the paper's): per pair, the best of six "
                       "scores, each rescaled as (r − τ_b) / (1 − τ_b) with its own threshold τ_b: the pixel "
                       "correlation (pixels at most 64 per axis in 2D, 32 in 3D) and the same at a quarter of that "
                       "size per axis (the full-size one against the best blend of two training images, for samples "
                       "that superimpose two); the rank (Spearman) correlation of the full-size pixels, for samples "
                       "rendered under another intensity curve; the correlation of the fine detail (each image "
                       "minus its blur) after "
                       f"aligning each of the {ALIGN_CANDIDATES} nearest candidates by the --score fused features to "
                       f"the image (mirror, rotation ±12°, zoom 0.8–1.25, translation up to 15%{_SHORTLIST_TEXT}); "
                       "the fine detail after bending those nearest candidates (in 3D the one the "
                       "alignment scored highest) onto the image by a smooth displacement of at most 3 pixels "
                       "(voxels in 3D); and, in 2D, for those bent pairs, "
                       f"{BENT_FEATURE_SHARE[2]:g} × their --score fused correlation + "
                       f"{1 - BENT_FEATURE_SHARE[2]:g} × their bent score, so the encoder's similarity counts "
                       "where the pixels confirm it (in 3D the --score fused correlation itself). The three "
                       "pixel correlations' thresholds also count the validation images down-sampled to 0.6 and 0.25 "
                       "of their size and back, so a new patient's image rendered with less detail does not pass for "
                       "a copy. 0 is a score's threshold and 1 an exact copy. Every score below, τ included, is on "
                       "that scale, not a correlation.",
}


def _build_report(summary: Mapping[str, Any], set_audits: Mapping[str, SetAudit], *, train_set: Any,
                  syn_sets: Mapping[str, Any], preprocess: Any, skipped: pd.DataFrame, out_dir: Path,
                  spatial_dims: int) -> Path:
    """Figures (``figures/*.png``) and the self-contained ``report.html`` of an audit."""
    from memscan.report import (
        ReportContent,
        ReportSection,
        comparison_table,
        figure_to_png,
        plot_distributions,
        plot_pair_gallery,
        set_headline,
        verdict,
        write_report,
    )
    from memscan.report.tables import format_fraction, interval, threshold_rule

    first = next(iter(set_audits.values()))
    tau = float(first.match.threshold)
    pct = float(summary["percentile"])
    figures_dir = out_dir / "figures"
    score = summary["provenance"]["config"].get("score", "embedding")
    is_r = score in CORRELATION_SCORES
    dist_png = figure_to_png(plot_distributions(first.match.best_val_for_train,
                                                {n: sa.match.best_synthetic_for_train for n, sa in set_audits.items()},
                                                tau, percentile=pct, headroom=float(summary.get("headroom", 0.0)),
                                                score_name="Pearson correlation" if is_r else f"{score} score"))
    write_bytes_atomic(figures_dir / "distributions.png", dist_png)
    train_names = _relative_names([r["image"] for r in train_set.records])
    sections = []
    for name, sa in set_audits.items():
        syn_records = syn_sets[name].records
        syn_names = _relative_names([r["image"] for r in syn_records])
        level, text = verdict(sa.block)
        figs, tables = [], []
        for kind, title in (("copies", "Strongest copies"), ("borderline", "Borderline pairs just below τ")):
            pairs, shown = _pairs(sa, kind, tau, train_set.records, syn_records, preprocess, train_names, syn_names,
                                  value_name="correlation" if is_r else "score")
            png = figure_to_png(plot_pair_gallery(pairs, title=f"{name}: {title.lower()}", threshold=tau,
                                                  spatial_dims=spatial_dims, score_symbol="r" if is_r else "score"))
            write_bytes_atomic(figures_dir / f"{kind}_{name}.png", png)
            caption = (f"{title}: each training image (blue frame) beside the synthetic image that matches it "
                       f"(orange frame), ranked by {'correlation' if is_r else 'score'}"
                       + ("; a blended image's other training source after it (blue frame)"
                          if any(p.second_image is not None for p in pairs) else "")
                       + ("; six evenly spaced slices per volume" if spatial_dims == 3 else ""))
            figs.append((caption, png))
            tables.append((f"{title} ({len(shown)} shown; all in synthetic_matches.csv)", shown))
        notes = [f"{sa.block.get('n_unauthentic', 0)} synthetic images are closer to a training image than any "
                 f"other training image is (authenticity {sa.block.get('authenticity', float('nan')):.3f})."]
        sections.append(ReportSection(name=name, verdict_level=level, verdict=text, headline=set_headline(sa.block),
                                      figures=figs, tables=tables, notes=notes))
    banners = []
    for w in summary["warnings"]:
        if "POSITIVE CONTROLS" in w:
            banners.append(("copies" if w.startswith("WARNING") else "review", w))
        elif w.startswith("release gate failed"):
            banners.append(("copies", w))
    controls = summary.get("controls", {})
    if controls.get("n"):
        if controls.get("share_caught", 0) >= 1.0:
            banners.append(("clean", f"Positive controls: all {controls['n']} perturbed training images were caught "
                                     f"— the detector finds near-copies."))
    tau_ci = interval(first.block, "threshold")
    overview = [
        ("threshold τ", f"{tau:.4f}" + (f" (95% CI {tau_ci[0]:.4f}–{tau_ci[1]:.4f})" if tau_ci else "")),
        ("τ rule", threshold_rule(summary)),
        ("training images", f"{first.block['n_train']} ({first.block.get('n_train_subjects', '?')} patients)"),
        ("validation images", str(first.block["n_val"])),
        ("null rate (memorized)", format_fraction(first.block.get("null_rate"))),
        ("null rate (copies)", format_fraction(first.block.get("null_rate_copies"))),
        ("expected by construction" + (" (at most, with the headroom)" if summary.get("headroom") else ""),
         format_fraction(first.block.get("null_rate_expected"))),
    ]
    if controls.get("n"):
        overview.append(("positive controls caught", f"{controls.get('n_caught', 0)} of {controls['n']}"))
    overview.append(("skipped files", str(summary["n_skipped"])))
    prov = summary["provenance"]
    provenance = {k: prov[k] for k in ("memscan_version", "monai_version", "torch_version", "checkpoint_sha256",
                                       "encoder_source", "started_utc")}
    provenance.update({f"config.{k}": v for k, v in prov["config"].items()})
    provenance.update({f"input.{k}": f"{v['n_files']} files, {v['n_skipped']} skipped, list sha256 "
                                     f"{v['file_list_sha256'][:16]}…" for k, v in prov["inputs"].items()})
    redact = set()
    for s in (train_set, *syn_sets.values()):
        for r in s.records:
            subject = str(r.get("subject_id", ""))
            if subject and subject not in str(r["image"]):
                redact.add(subject)  # e.g. a DICOM PatientID: never shown in the report
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(t)}(?![\w-])" for t in sorted(redact, key=len, reverse=True))
                         ) if redact else None

    def scrub(text: str) -> str:
        return pattern.sub("[patient id]", text) if pattern is not None else text

    shown_skipped = skipped[["set", "path", "reason"]].copy() if len(skipped) else skipped
    if len(shown_skipped):
        shown_skipped["reason"] = [scrub(str(r)) for r in shown_skipped["reason"]]
    content = ReportContent(
        title=f"memscan audit — {', '.join(set_audits)}",
        intro=(f"{spatial_dims}D audit of {len(set_audits)} synthetic set(s) against {first.block['n_train']} "
               f"training images, with τ calibrated on {first.block['n_val']} validation images of other "
               f"patients. Encoder: {prov['config']['arch']} ({prov['encoder_source']})."),
        banners=banners, overview=overview,
        comparison=comparison_table({n: sa.block for n, sa in set_audits.items()}),
        figures=[(f"The paper's figure: for every training image, its best {'correlation' if is_r else 'score'} "
                  "with a validation image (blue; τ is its percentile) and with a synthetic image (orange). Orange "
                  "mass right of τ = memorized training images.", dist_png)],
        sections=sections, skipped=shown_skipped, warnings=[scrub(w) for w in summary["warnings"]],
        method=[_METHOD[0] + " " + _SCORE_TEXT[prov["config"].get("score", "embedding")], *_METHOD[1:]],
        provenance=provenance,
    )
    return write_report(content, out_dir / "report.html")


def audit(
    train: Any,
    val: Any,
    synthetic: Any,
    *,
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    bundle: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    image_size: int | Sequence[int] | None = None,
    spatial_dims: int | None = None,
    percentile: float = 95.0,
    headroom: float | None = None,
    device: str = "auto",
    controls: int = DEFAULT_CONTROLS,
    fail_above: float | None = None,
    export_clean: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    layout: str = "auto",
    subject_regex: str | None = None,
    strict: bool = False,
    batch_size: int = 16,
    n_bootstrap: int = 1000,
    seed: int = 0,
    train_overrides: Mapping[str, Any] | None = None,
    score: str = DEFAULT_SCORE,
    precision: str = "auto",
) -> AuditResult:
    """Audit one or more synthetic sets for copies of the training patients (Dar et al. 2025).

    Args:
        train: the generative model's training images: folder, CSV manifest, NIH / MRNet root, or an ``ImageSet``.
        val: held-out real images of *other* patients (calibrate τ), same kinds.
        synthetic: one source, a list of sources, or ``{name: source}`` for several sets compared side by side.
        out_dir: output folder (must be empty or new, unless ``overwrite`` or it holds an interrupted audit).
        checkpoint: encoder checkpoint (plain state_dict). Takes precedence over the bundle's ``models/model.pt``;
            the ``encoder.json`` written beside it at training (architecture, embedding size, image size,
            preprocessing) overrides the bundle's settings, and ``image_size`` / ``train_overrides`` override both.
        bundle: bundle folder (or name: ``memscan_cxr_2d`` / ``memscan_knee_3d``) whose settings define the
            encoder and preprocessing; its ``models/model.pt`` is used when no ``checkpoint`` is given.
        epochs, image_size: when neither checkpoint nor bundle model exists, a small encoder is trained on
            ``train`` with these (memscan's ``default`` preset otherwise).
        spatial_dims: 2 or 3; inferred from the training set when None.
        percentile: τ's percentile of the train→validation best correlations.
        headroom: in [0, 1): flag against ``τ + headroom · (1 − τ)`` instead of τ (``memscan.metrics.match``;
            0 = the paper's rule); None (default) = :func:`default_headroom` of ``score``: 0.5 for
            ``"best-of-aligned"``, which cut false alarms on a new patient from 0.40-0.45 to 0.03-0.04 on the
            detection benchmark's MRI (recall 0.96 / 0.93; CT 0.00, chest X-rays 0.09), losing some zoomed and
            warped copies (docs/benchmarks/detection_candidates.md section 10); 0 for every other score.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        controls: number of positive controls (perturbed training images embedded beside the synthetic sets; their
            catch rate is reported and they are excluded from every statistic). 0 disables them.
        fail_above: release gate: ``gate_failed`` is set when any set's copy fraction exceeds it.
        export_clean: folder receiving the synthetic files that are not copies (names and formats kept; one
            sub-folder per set when several sets are audited).
        overwrite: allow a non-empty ``out_dir`` / ``export_clean``.
        layout, subject_regex, strict: passed to :func:`memscan.data.load_image_set` (``subject_regex`` for the
            training and validation sets only: synthetic images have no patient).
        batch_size: embedding batch size.
        n_bootstrap: bootstrap draws for the intervals.
        seed: seed of the controls, bootstrap, null split and k-means.
        train_overrides: extra bundle config overrides when training the encoder (e.g. ``{"arch": "resnet10"}``).
        score: ``"fused"`` (flip-invariant pixel + embedding features, see :func:`score_features`; the default
            of earlier versions, a thousand times cheaper to match, docs/benchmarks/scores.txt), ``"embedding"``
            (Dar et al.'s embedding correlation) or ``"aligned"`` (the fused features' :data:`ALIGN_CANDIDATES`
            best candidates of every query re-scored after test-time alignment,
            :func:`memscan.scoring.align_and_correlate`: catches shifted, rotated and zoomed copies better, at a few
            more false alarms and ~10-50 ms per image on a CPU; docs/benchmarks/detection_alignment.md) or
            ``"best-of"`` (per pair, the better of the fused score and
            pixel Pearson at :func:`best_of_pixel_size`, each scaled by its own τ_b, ``memscan.metrics.match``'s
            ``best_of``: catches blends of a training image with another image and contrast or detail changes that
            the embedding misses, at more false alarms on new patients; docs/benchmarks/detection_candidates.md;
            the pixels are written as ``embeddings/<set>_pixels.npy``) or ``"best-of-aligned"`` (the best of six
            scores, each scaled by its own τ_b: pixel Pearson at :func:`best_of_pixel_size` (with the best blend of
            two training images, :data:`BLEND_PIXELS`) and at a quarter of it (:func:`best_of_pixel_sizes`,
            ``embeddings/<set>_pixels_16x16.npy`` and the like), the full-size pixels' Spearman correlation
            (:data:`RANK_PIXELS`, from ``<set>_pixels.npy``), the aligned correlation of the fused features'
            :data:`ALIGN_CANDIDATES` best candidates (in 2D and a few more from deeper down, :data:`ALIGN_SHORTLIST`)
            on pixels minus their blur (:data:`ALIGN_HIGHPASS`, at :func:`alignment_size`), the first ones bent onto
            their query by a smooth field
            (:data:`ALIGN_DEFORM`), and those bent pairs' fused score mixed with their bent one
            (:data:`BENT_FEATURE_SHARE`; the fused score itself in 3D); the three pixel parts' τ_b also count the
            validation images at :data:`NULL_LOW_RESOLUTION` of their resolution; the default, :data:`DEFAULT_SCORE`:
            the best AUROC of the detection benchmark, and with its default headroom more copies caught and fewer
            false alarms on new patients than the fused score; docs/benchmarks/detection_candidates.md); τ and
            everything downstream are computed on the chosen score. ``score="embedding", headroom=0`` is the paper's
            recipe.
        precision: embedding precision, ``"auto"`` (float16 on CUDA, bfloat16 on CPUs with native bf16, else
            float32), ``"float32"``, ``"bfloat16"`` or ``"float16"`` (see :func:`memscan.embed.resolve_precision`);
            the resolved one is recorded in ``summary.json``.

    Returns:
        :class:`AuditResult`.

    Raises:
        InputError: unusable inputs (after the preflight), bad arguments, a non-empty output folder, a checkpoint
            that does not fit the encoder.
    """
    import monai
    import torch

    from memscan.data import check_sets
    from memscan.embed import configured_preprocess, embed_images, file_sha256, resolve_precision
    from memscan.metrics import best_of_correlation, match, resolve_device, topk_correlation
    from memscan.networks import build_encoder, load_encoder_checkpoint

    started = time.time()
    headroom = _check_args(percentile, controls, fail_above, batch_size, score, headroom)
    used_precision = resolve_precision(precision, resolve_device(device))  # a bad value fails before any work
    sources = _synthetic_sources(synthetic)
    out = Path(out_dir).expanduser().resolve()
    export_dir = None if export_clean is None else Path(export_clean).expanduser().resolve()
    if export_dir is not None and (export_dir == out or out in export_dir.parents):
        raise InputError(export_dir, "the clean export must go outside the audit's output folder")
    resumed = _prepare_out_dir(out, overwrite)
    if resumed:
        logger.info("resuming the interrupted audit in %s (cached embeddings are reused)", out)
    warnings: list[str] = []

    # 1. preflight ------------------------------------------------------------------------------------------
    logger.info("preflight: reading the training, validation and %d synthetic set(s)", len(sources))
    train_set = _load_set(train, "train", layout=layout, subject_regex=subject_regex, strict=strict,
                          spatial_dims=spatial_dims)
    dims = int(spatial_dims or train_set.spatial_dims)
    val_set = _load_set(val, "val", layout=layout, subject_regex=subject_regex, strict=strict, spatial_dims=dims)
    # synthetic images belong to no patient: the subject regex applies to the real sets only
    syn_sets = {name: _load_set(src, name, layout=layout, subject_regex=None, strict=strict, spatial_dims=dims)
                for name, src in sources.items()}
    for s in (train_set, val_set, *syn_sets.values()):
        if int(s.spatial_dims) != dims:
            raise InputError(s.source or s.name, f"set '{s.name}' is {s.spatial_dims}D but the audit is {dims}D")
    report = check_sets(train_set, val_set, syn_sets)
    warnings.extend(str(w) for w in report.warnings)
    warnings.extend(f"note: {n}" for n in getattr(report, "notes", []))
    if not report.usable:
        errors = report.errors
        problems = [f"{k}: {v}" for k, v in errors.items()] if isinstance(errors, Mapping) else list(errors)
        raise InputError("preflight", "; ".join(problems) or "the inputs are not usable")
    skipped = pd.concat([s.skipped for s in (train_set, val_set, *syn_sets.values())], ignore_index=True)
    if len(train_set) < 2 or len(val_set) < 2:
        raise InputError("preflight", f"need at least 2 training and 2 validation images "
                                      f"(got {len(train_set)} and {len(val_set)})")

    # 2. encoder ----------------------------------------------------------------------------------------------
    bundle_path = _resolve_bundle(bundle, dims)
    settings = _bundle_settings(bundle_path, dims)
    if checkpoint is not None:  # how that checkpoint was trained, when memscan trained it
        settings.update(_sidecar_settings(Path(checkpoint).expanduser(), dims, settings))
    if image_size is not None:
        from memscan.training import as_spatial_size

        settings["image_size"] = list(as_spatial_size(image_size, dims))
    overrides = dict(train_overrides or {})
    for key in ("arch", "embedding_dim"):
        if key in overrides:
            settings[key] = overrides[key]
    ckpt: Path | None = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        source_kind = "checkpoint"
    elif bundle_path is not None and (bundle_path / "models" / "model.pt").is_file():
        ckpt = bundle_path / "models" / "model.pt"
        source_kind = "bundle model"
    if ckpt is not None and not ckpt.is_file():
        raise InputError(ckpt, "checkpoint file not found")
    if ckpt is None:
        from memscan.training import train_encoder

        source_kind = "trained on the training set"
        logger.info("no checkpoint given: training a %s encoder on %d training images", settings["arch"],
                    len(train_set))
        train_over: dict[str, Any] = {"arch": settings["arch"], "embedding_dim": int(settings["embedding_dim"])}
        if device != "auto":
            train_over["device"] = f"$torch.device('{resolve_device(device)}')"
        train_over.update(overrides)
        ckpt = train_encoder(train_set, val_set, spatial_dims=dims, out_dir=out / "encoder", epochs=epochs,
                             image_size=settings["image_size"], overrides=train_over or None)
    network = build_encoder(dims, str(settings["arch"]), int(settings["embedding_dim"]))
    network = load_encoder_checkpoint(network, ckpt)
    network.eval()
    ckpt_sha = file_sha256(ckpt)
    preprocess_cfg = _preprocess_config(dims, settings)
    preprocess = configured_preprocess(preprocess_cfg)

    # 3. embeddings -------------------------------------------------------------------------------------------
    from memscan.training import as_spatial_size

    cache_dir = out / "embeddings" / "cache"
    spatial_size = list(as_spatial_size(settings["image_size"], dims))
    all_sets = {"train": train_set, "val": val_set, **syn_sets}
    embeddings: dict[str, np.ndarray] = {}
    aligned_images: dict[str, np.ndarray] = {}  # aligned scores: coarse images of every set
    pixel_sets: dict[str, list[np.ndarray]] = {}  # best-of scores: the pixel feature sets of every set
    # best-of's full-size pixels as <set>_pixels.npy, best-of-aligned's quarter-size ones as <set>_pixels_16x16.npy
    # (the ranks of the full-size ones, RANK_PIXELS, are not written: rank_rows of <set>_pixels.npy)
    pixel_files = ["pixels"] + ["pixels_" + "x".join(map(str, size))
                                for size in best_of_pixel_sizes(spatial_size, score)[1:]]
    for name, s in all_sets.items():
        logger.info("embedding %s: %d image(s)", name, len(s))
        found = _score_features(network, s.records, preprocess, score=score, image_size=spatial_size,
                                batch_size=batch_size, device=device, cache_dir=cache_dir,
                                checkpoint_sha256=ckpt_sha, precision=precision)
        embeddings[name] = np.asarray(found.features, dtype=np.float32)
        if found.aligned is not None:
            aligned_images[name] = found.aligned
        if found.pixels:
            pixel_sets[name] = found.pixels
            for stem, array in zip(pixel_files, found.pixels):
                save_npy_atomic(out / "embeddings" / f"{name}_{stem}.npy", array)
        save_npy_atomic(out / "embeddings" / f"{name}.npy", embeddings[name])

        write_csv_atomic(pd.DataFrame({"index": np.arange(len(s)), "path": [r["image"] for r in s.records],
                                "subject_id": [r.get("subject_id") for r in s.records]}),
                  out / "embeddings" / f"{name}_files.csv")

    null_views = None  # best-of-aligned: its pixel parts' null takes the validation images at lower resolutions too
    if score == "best-of-aligned":
        logger.info("calibrating the pixel scores on the validation images at %s of their resolution too",
                    " and ".join(map(str, NULL_LOW_RESOLUTION)))
        null_views = _low_resolution_pixels(val_set.records, preprocess, best_of_pixel_sizes(spatial_size, score),
                                            NULL_LOW_RESOLUTION)

    # positive controls: perturbed training images, embedded with the synthetic sets, never in the statistics
    rng = np.random.default_rng(seed)
    n_controls = int(min(controls, len(train_set)))
    control_src = (np.sort(rng.choice(len(train_set), size=n_controls, replace=False)) if n_controls
                   else np.array([], dtype=int))
    control_emb = None
    if n_controls:
        logger.info("embedding %d positive control(s) (perturbed training images)", n_controls)
        ctrl_tf = _controls_transform(preprocess, spatial_size, seed)
        if score == "embedding":
            control_emb = np.asarray(embed_images(network, [train_set.records[i] for i in control_src], ctrl_tf,
                                                  batch_size=batch_size, device=device, cache_dir=None,
                                                  precision=precision), np.float32)
        else:  # perturbed once, in order, from the seed, so the pixels and both embeddings see the same image
            control_images = [{"image": _preprocessed_image(ctrl_tf, train_set.records[i])} for i in control_src]
            found = _score_features(network, control_images, _identity, score=score, image_size=spatial_size,
                                    batch_size=batch_size, device=device, cache_dir=None, checkpoint_sha256=None,
                                    precision=precision)
            control_emb = found.features
            if found.aligned is not None:
                aligned_images["controls"] = found.aligned
            if found.pixels:
                pixel_sets["controls"] = found.pixels

    # 4. matching ---------------------------------------------------------------------------------------------
    train_paths = [r["image"] for r in train_set.records]
    train_subjects = [str(r.get("subject_id")) for r in train_set.records]
    val_subjects = [str(r.get("subject_id")) for r in val_set.records]
    # the null rate splits the validation set by patient; with a single validation patient it splits by image
    # (the preflight's few-patients warning says so)
    split_by_subject = len(set(val_subjects)) >= 2
    set_audits: dict[str, SetAudit] = {}
    controls_block: dict[str, Any] = {"n": n_controls}
    axes = _alignment(preprocess_cfg)
    # the search runs where the match does
    align_axes = {**_score_align_axes(score, axes, int(preprocess_cfg.spatial_dims)), "device": device}
    calibration_memo: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # train → validation, the same for every set
    features = {**embeddings, "controls": control_emb}

    def score_sets(set_name: str) -> list[np.ndarray]:
        """The feature sets match() scores for one image set, in its order: the matched features (whose candidates
        the alignment re-scores, when there is one), then best-of's pixels and, for best-of-aligned where
        :data:`BENT_FEATURE_SHARE` does not mix them into the bent pairs' score, the fused features' own
        correlations."""
        found = [features[set_name]]
        if pixel_sets:
            found.extend(pixel_sets[set_name])
            if aligned_images and "feature_share" not in align_axes.get("deform", {}):
                found.append(features[set_name])
        return found
    # best-of-aligned scores its full-size pixels (the first best_of set) as blends of two references
    blend = [0] if BLEND_PIXELS and score == "best-of-aligned" else []
    for name, s in syn_sets.items():
        logger.info("matching %s against the training set", name)
        syn_paths = [r["image"] for r in s.records]
        refine = None
        if aligned_images:
            refine = _aligned_refine({"train": aligned_images["train"], "val": aligned_images["val"],
                                      "synthetic": aligned_images[name]}, align_axes, calibration_memo)
        sets = [score_sets(k) for k in ("train", "val", name)]
        best_of = list(zip(*(s_[1:] for s_ in sets))) or None  # per extra feature set: (train, val, synthetic)
        res = match(embeddings["train"], embeddings["val"], embeddings[name], percentile, device,
                    train_subjects=train_subjects if split_by_subject else None,
                    val_subjects=val_subjects if split_by_subject else None, n_bootstrap=n_bootstrap, seed=seed,
                    train_ids=train_paths, synthetic_ids=syn_paths, refine=refine,
                    refine_k=_retrieval_depth(align_axes), best_of=best_of, blend=blend, headroom=headroom,
                    null_views=None if null_views is None else
                    null_views + [[] for _ in range(len(best_of) - len(null_views))])
        block = dict(res.summary)
        n_subj_mem, n_subj = _subject_counts(train_set.records, res.train_table["memorized"].to_numpy(bool))
        block.update({"n_memorized_subjects": n_subj_mem, "n_train_subjects": n_subj,
                      "frac_memorized_subjects": n_subj_mem / n_subj if n_subj else None})
        ct = data_copying_statistic(embeddings["train"], embeddings["val"], embeddings[name], seed=seed,
                                    device=device)
        same_score = refine is None and not pixel_sets  # aligned / best-of scores are not these features' correlations
        auth = authenticity_score(embeddings["train"], embeddings[name],
                                  best_train_index=res.synthetic_table["best_train_index"].to_numpy()
                                  if same_score else None,
                                  best_train_correlation=res.synthetic_table["correlation"].to_numpy()
                                  if same_score else None,
                                  device=device)
        block.update({k: v for k, v in ct.items()})
        block.update({"authenticity": auth["authenticity"], "n_unauthentic": auth["n_unauthentic"]})
        if n_controls and not controls_block.get("threshold"):
            aligned_v = aligned_i = None
            if refine is not None:  # the same re-scoring as the synthetic images
                cand_v, cand_i = topk_correlation(control_emb, embeddings["train"],
                                                  min(_retrieval_depth(align_axes), len(train_set)),
                                                  device=device)
                aligned_v, aligned_i = _aligned_refine(
                    {"controls": aligned_images["controls"], "train": aligned_images["train"]},
                    align_axes)("controls", np.arange(n_controls), "train", cand_i, cand_v)
            if pixel_sets:  # the same best-of score as the synthetic images, on this set's τ_b
                skip = 0 if refine is None else 1  # a refined first set comes as its aligned scores
                values, indices = best_of_correlation(
                    score_sets("controls")[skip:], score_sets("train")[skip:], res.summary["feature_set_thresholds"],
                    refined=None if refine is None else (aligned_v, aligned_i), blend=blend, device=device)
                values, indices = values[:, None], indices[:, None]
            elif refine is None:
                values, indices = topk_correlation(control_emb, embeddings["train"], 1, device=device)
            else:
                values, indices = aligned_v[:, None], aligned_i[:, None]
            caught = values[:, 0] > res.threshold
            controls_block.update({
                "n_caught": int(caught.sum()), "share_caught": float(caught.mean()),
                "n_matched_to_source": int((caught & (indices[:, 0] == control_src)).sum()),
                "threshold": res.threshold, "correlations": values[:, 0].tolist(),
                "source_files": [train_paths[i] for i in control_src],
            })
        block["controls"] = {k: controls_block.get(k) for k in ("n", "n_caught", "share_caught",
                                                                  "n_matched_to_source")}
        syn_table = res.synthetic_table.rename(columns={"synthetic_id": "path", "best_train_id": "train_path",
                                                        "second_train_id": "second_train_path",
                                                        "correlation": "best_train_correlation"})
        syn_table.insert(0, "synthetic_set", name)
        syn_table["authentic"] = ~auth["unauthentic"]
        train_table = res.train_table.rename(columns={"train_id": "path", "best_synthetic_id": "synthetic_path",
                                                      "correlation": "best_synthetic_correlation"})
        train_table.insert(0, "synthetic_set", name)
        train_table.insert(3, "subject_id", train_subjects)
        set_audits[name] = SetAudit(name=name, match=res, block=block, synthetic_table=syn_table,
                                    train_table=train_table)
    if n_controls:
        share = controls_block["share_caught"]
        if share < 1.0:
            msg = (f"POSITIVE CONTROLS NOT CAUGHT: only {controls_block['n_caught']} of {n_controls} perturbed "
                   f"training images were flagged as copies. This audit may miss real copies: train the encoder "
                   f"longer or on more data, or check the preprocessing.")
            if share < 0.5:
                msg = "WARNING — " + msg
            warnings.append(msg)
            logger.warning(msg)

    # 5. outputs ------------------------------------------------------------------------------------------------

    write_csv_atomic(pd.concat([sa.train_table for sa in set_audits.values()], ignore_index=True), out / "train_matches.csv")
    write_csv_atomic(pd.concat([sa.synthetic_table for sa in set_audits.values()], ignore_index=True),
              out / "synthetic_matches.csv")
    write_csv_atomic(skipped, out / "skipped.csv")

    gate_failed = False
    if fail_above is not None:
        over = [n for n, sa in set_audits.items() if sa.block["frac_copies_synthetic"] > fail_above]
        gate_failed = bool(over)
        if over:
            warnings.append(f"release gate failed: copy fraction above {fail_above:g} in {', '.join(over)}")
    exported: dict[str, list[str]] = {}
    if export_dir is not None:
        exported = _export_clean(set_audits, {n: s.records for n, s in syn_sets.items()}, export_dir, overwrite)

    first = next(iter(set_audits.values()))
    metric_keys = {k: v for k, v in first.block.items() if k in first.match.summary}
    summary: dict[str, Any] = dict(metric_keys)
    summary.update({
        "synthetic_set_names": list(set_audits),
        "synthetic_sets": {n: sa.block for n, sa in set_audits.items()},
        "controls": {k: v for k, v in controls_block.items() if k != "correlations"},
        "skipped": {s.name: int(len(s.skipped)) for s in all_sets.values()},
        "n_skipped": int(len(skipped)),
        "warnings": warnings,
        "gate": {"fail_above": fail_above, "failed": gate_failed},
        "export_clean": None if export_dir is None else {"dir": str(export_dir),
                                                          "n_files": {n: len(v) for n, v in exported.items()}},
        "provenance": {
            "memscan_version": __version__,
            "monai_version": monai.__version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "checkpoint": str(ckpt),
            "checkpoint_sha256": ckpt_sha,
            "encoder_source": source_kind,
            "bundle": None if bundle_path is None else str(bundle_path),
            "config": {
                "spatial_dims": dims, "arch": settings["arch"], "embedding_dim": int(settings["embedding_dim"]),
                "image_size": list(settings["image_size"]), "preprocess": repr(preprocess_cfg),
                "percentile": float(percentile), "headroom": float(headroom), "device": str(resolve_device(device)),
                "controls": int(controls),
                "batch_size": int(batch_size), "n_bootstrap": int(n_bootstrap), "seed": int(seed),
                "epochs": epochs, "layout": layout, "subject_regex": subject_regex, "strict": bool(strict),
                "fail_above": fail_above, "score": score,
                "null_low_resolution": list(NULL_LOW_RESOLUTION) if null_views is not None else None,
                "blend_pixels": bool(blend),
                "rank_pixels": _ranks_pixels(score),
                # the non-rigid fit's settings (its optimizer included), as the audit ran them
                "deform": json_safe(_score_align_axes(score, {}, spatial_dims=dims).get("deform")),
                "precision": used_precision,
            },
            "inputs": {s.name: {"source": str(getattr(s, "source", "")), "n_files": len(s),
                                "n_skipped": int(len(s.skipped)),
                                "file_list_sha256": _file_list_hash([r["image"] for r in s.records])}
                       for s in all_sets.values()},
            "resumed": resumed,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 2),
        },
    })
    report_path = _build_report(summary, set_audits, train_set=train_set, syn_sets=syn_sets, preprocess=preprocess,
                               skipped=skipped, out_dir=out, spatial_dims=dims)
    summary["provenance"]["seconds"] = round(time.time() - started, 2)
    write_json_atomic(out / "summary.json", summary)
    (out / _MARKER).unlink(missing_ok=True)
    logger.info("audit written to %s (report: %s)", out, report_path)
    return AuditResult(out_dir=out, summary=summary, sets=set_audits, report_path=report_path, checkpoint=Path(ckpt),
                       gate_failed=gate_failed, exported=exported, warnings=warnings)


def exit_on_gate(result: AuditResult) -> AuditResult:
    """Exit with code 3 (:data:`memscan.errors.EXIT_GATE`) when the audit's release gate failed.

    Used by the bundles' ``configs/audit.json`` so ``python -m monai.bundle run`` fails a CI pipeline exactly
    like ``memscan audit --fail-above``.
    """
    if result.gate_failed:
        import sys

        from memscan.errors import EXIT_GATE

        logger.error("release gate failed: %s", result.summary["gate"])
        sys.exit(EXIT_GATE)
    return result


# ----------------------------------------------------------------------------------------------------------------
# the demo: planted copies in real images, audited end to end
# ----------------------------------------------------------------------------------------------------------------
#: Demo settings per dimensionality: encoder and training kept small enough for ~2 minutes on two CPU cores.
DEMO_SETTINGS: dict[int, dict[str, Any]] = {
    2: {"folder": "mri2d", "arch": "resnet10", "embedding_dim": 64, "image_size": [64, 64], "epochs": 12,
        "batch_size": 8, "val_interval": 4, "n_copies": 8, "n_unseen": 24},
    3: {"folder": "mri3d", "arch": "resnet10", "embedding_dim": 32, "image_size": [64, 64, 16], "epochs": 6,
        "batch_size": 4, "val_interval": 3, "n_copies": 2, "n_unseen": 4},
}


@dataclass
class DemoInputs:
    """The demo's input folders and the ground truth of its synthetic set.

    Attributes:
        train: training images (one subject).
        val: validation images (another subject).
        synthetic: the synthetic folder written by :func:`build_demo`.
        truth: one row per synthetic file: ``file``, ``kind`` (``"planted copy"`` / ``"unseen subject"``) and the
            ``source`` image it was made from.
        subject_regex: subject regex for the real sets (None: their manifests carry ``subject_id``).
        spatial_dims: 2 or 3.
    """

    train: Path
    val: Path
    synthetic: Path
    truth: pd.DataFrame
    subject_regex: str | None
    spatial_dims: int


@dataclass
class DemoResult:
    """Outcome of :func:`run_demo`: the audit plus how it did against the planted ground truth."""

    audit: AuditResult
    inputs: DemoInputs
    n_copies_planted: int
    n_copies_caught: int
    n_unseen: int
    n_unseen_flagged: int


def _perturb_file(src: Path, dst: Path, spatial_dims: int, seed: int) -> None:
    """Write a perturbed copy of ``src`` in its format (MONAI transforms): a sub-voxel shift (resampling), intensity
    ±3% and Gaussian noise of 1% of the range — a near-duplicate like the memorized samples of Dar et al."""
    from monai.transforms import Compose, LoadImage, RandAffine, RandGaussianNoise, RandScaleIntensity

    image = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    perturb = Compose([
        RandAffine(prob=1.0, translate_range=[0.25] * spatial_dims, padding_mode="border"),  # sub-voxel shift
        RandScaleIntensity(factors=0.03, prob=1.0),
        RandGaussianNoise(prob=1.0, std=0.01 * (hi - lo)),
    ])
    perturb.set_random_state(seed=seed)
    out = np.clip(np.asarray(perturb(arr), dtype=np.float32)[0], lo, hi)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if spatial_dims == 2:
        from PIL import Image

        # LoadImage returns PNGs as (x, y): transpose back to PIL's (rows, columns)
        Image.fromarray(np.round(out).astype(np.uint8).T).save(dst)
    else:
        import nibabel as nib

        src_img = nib.load(str(src))
        dtype = np.dtype(src_img.get_data_dtype())
        data = np.round(out).astype(dtype) if dtype.kind in "iu" else out.astype(dtype)
        nib.save(nib.Nifti1Image(data, src_img.affine, src_img.header), str(dst))


def build_demo(out_dir: str | os.PathLike[str], *, spatial_dims: int = 2, n_copies: int | None = None,
               n_unseen: int | None = None, seed: int = 0) -> DemoInputs:
    """Build the demo's inputs from the real demo data (:func:`memscan.data.demo_data_dir`).

    Training and validation images are two different subjects. The synthetic set (written to
    ``out_dir/synthetic`` with neutral names) holds ``n_copies`` perturbed copies of evenly spaced training images
    — planted copies a good audit must catch — and ``n_unseen`` images of a third subject the model never saw,
    which it should not flag (beyond the threshold's false-alarm rate). The ground truth goes to
    ``out_dir/truth.csv``.

    Args:
        out_dir: folder for the synthetic set and the truth table.
        spatial_dims: 2 (axial T1 slices, PNG) or 3 (T1 slabs, NIfTI).
        n_copies: planted copies (default per :data:`DEMO_SETTINGS`).
        n_unseen: unseen-subject images (default per :data:`DEMO_SETTINGS`; capped at what exists).
        seed: seed of the perturbations and of the file order.

    Returns:
        :class:`DemoInputs`.

    Raises:
        InputError: bad ``spatial_dims``, or the demo data is missing from the installation.
    """
    from memscan.data import demo_data_dir

    if spatial_dims not in DEMO_SETTINGS:
        raise InputError("dims", f"must be 2 or 3, got {spatial_dims!r}")
    cfg = DEMO_SETTINGS[spatial_dims]
    root = demo_data_dir() / cfg["folder"]
    if not (root / "train").is_dir():
        raise InputError(root, "demo data not found in this installation (reinstall memscan from its source tree)")
    ext = ".png" if spatial_dims == 2 else ".nii.gz"
    train_files = sorted(p for p in (root / "train").iterdir() if p.name.endswith(ext))
    unseen_files = sorted(p for p in (root / "unseen").iterdir() if p.name.endswith(ext))
    n_copies = min(int(cfg["n_copies"] if n_copies is None else n_copies), len(train_files))
    n_unseen = min(int(cfg["n_unseen"] if n_unseen is None else n_unseen), len(unseen_files))
    out = Path(out_dir).expanduser().resolve()
    syn = out / "synthetic"
    shutil.rmtree(syn, ignore_errors=True)
    rng = np.random.default_rng(seed)
    picks = [train_files[int(i)] for i in np.linspace(0, len(train_files) - 1, n_copies).round()] if n_copies else []
    unseen = [unseen_files[int(i)] for i in np.linspace(0, len(unseen_files) - 1, n_unseen).round()] if n_unseen else []
    items = [("planted copy", p) for p in picks] + [("unseen subject", p) for p in unseen]
    order = rng.permutation(len(items))
    rows = []
    for k, idx in enumerate(order):
        kind, src = items[int(idx)]
        dst = syn / f"sample_{k:03d}{ext}"
        if kind == "planted copy":
            _perturb_file(src, dst, spatial_dims, seed + k)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        rows.append({"file": dst.name, "kind": kind, "source": f"{cfg['folder']}/{src.parent.name}/{src.name}"})
    truth = pd.DataFrame(rows, columns=["file", "kind", "source"])

    write_csv_atomic(truth, out / "truth.csv")
    return DemoInputs(train=root / "train", val=root / "val", synthetic=syn, truth=truth, subject_regex=None,
                      spatial_dims=spatial_dims)


def run_demo(out_dir: str | os.PathLike[str] = "memscan-demo", *, dims: int = 2, epochs: int | None = None,
             image_size: int | Sequence[int] | None = None, device: str = "auto", controls: int = DEFAULT_CONTROLS,
             n_bootstrap: int = 1000, seed: int = 0, arch: str | None = None, score: str = DEFAULT_SCORE,
             headroom: float | None = None) -> DemoResult:
    """Build the demo inputs, train a small encoder, audit, and score the audit against the planted truth.

    ``out_dir`` receives ``inputs/`` (synthetic set + ``truth.csv``) and ``audit/`` (the audit's outputs and
    ``report.html``). Rerunning into the same folder replaces the previous demo (the trained encoder is reused).

    Args:
        out_dir: demo folder (new, empty, or a previous demo).
        dims: 2 or 3.
        epochs, image_size, arch: override :data:`DEMO_SETTINGS` (smaller = faster).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        controls: positive controls.
        n_bootstrap: bootstrap draws.
        seed: seed of the demo inputs and the audit.
        score, headroom: the audit's score and threshold headroom (see :func:`audit`; None = the score's default).

    Returns:
        :class:`DemoResult`.

    Raises:
        InputError: ``out_dir`` holds something other than a previous demo, or a demo of the other dimensionality.
    """
    if dims not in DEMO_SETTINGS:
        raise InputError("dims", f"must be 2 or 3, got {dims!r}")
    headroom = _check_args(95.0, controls, None, 16, score, headroom)  # before the inputs are built
    cfg = DEMO_SETTINGS[dims]
    out = Path(out_dir).expanduser().resolve()
    previous = (out / "inputs" / "truth.csv").is_file()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not previous)):
        raise InputError(out, "demo folder exists and is not a previous memscan demo; choose another --out")
    if previous:  # its encoder would be resumed: the same dimensionality only (checked before its inputs are replaced)
        from memscan.training import read_encoder_settings

        earlier = read_encoder_settings(out / "audit" / "encoder" / "model.pt").get("spatial_dims", dims)
        if earlier != dims:
            raise InputError(out, f"holds a {earlier}D demo; choose another --out for the {dims}D demo, or remove "
                                  f"this folder")
    inputs = build_demo(out / "inputs", spatial_dims=dims, seed=seed)
    size = cfg["image_size"] if image_size is None else image_size
    result = audit(inputs.train, inputs.val, {"synthetic": inputs.synthetic}, out_dir=out / "audit",
                   epochs=int(cfg["epochs"] if epochs is None else epochs), image_size=size, spatial_dims=dims,
                   device=device, controls=controls, overwrite=previous, n_bootstrap=n_bootstrap, seed=seed,
                   subject_regex=inputs.subject_regex, score=score, headroom=headroom,
                   train_overrides={"arch": arch or cfg["arch"], "embedding_dim": cfg["embedding_dim"],
                                    "batch_size": cfg["batch_size"], "num_workers": 0,
                                    "val_interval": min(int(cfg["val_interval"]), int(cfg["epochs"] if epochs is None
                                                                                      else epochs))})
    table = result.sets["synthetic"].synthetic_table
    flagged = dict(zip(table["path"].map(lambda p: Path(p).name), table["copy"].astype(bool)))
    truth = inputs.truth
    planted = truth.loc[truth["kind"] == "planted copy", "file"]
    unseen = truth.loc[truth["kind"] == "unseen subject", "file"]
    return DemoResult(audit=result, inputs=inputs, n_copies_planted=len(planted),
                      n_copies_caught=int(sum(flagged.get(f, False) for f in planted)), n_unseen=len(unseen),
                      n_unseen_flagged=int(sum(flagged.get(f, False) for f in unseen)))


class _CallableModule(types.ModuleType):
    """Lets ``memscan.audit(...)`` work after ``import memscan.audit``: importing the submodule replaces the package
    attribute ``memscan.audit`` (the lazily exported function) with this module, so the module forwards calls."""

    def __call__(self, *args: Any, **kwargs: Any) -> AuditResult:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
