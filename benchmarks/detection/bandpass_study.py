"""Lever study: aligned pixel correlation on band-passed images (issue 6).

Question: brains (and CT slices) of different people share their coarse anatomy, so a search over flips, rotations,
zooms and shifts raises the correlation of unrelated pairs (the null behind τ). Does correlating only the finer
detail — a high-pass (image minus its Gaussian blur) or a difference of Gaussians — after the same alignment
separate copies from novel images better?

For one case and its first subject permutation (train, val, unseen), with no learned features: every query is
aligned to every training image (``memscan.scoring.align_and_correlate``, the product's grids, mirror included,
images area-downsampled 2× per axis as ``--score aligned`` does); τ = 95th percentile of each training image's
best aligned validation correlation; positives = training images through each perturbation family, negatives =
the unseen subject's images through the same family. Prints AUROC / recall at τ / FPR at τ per family for each
band (``plain``, ``hp0-2`` = image minus Gaussian σ 2 px, ``dog0.5-3``, ``dog1-4``) and for plain + high-pass mixes.

Usage (≈ 4 min per band per 2D case on one CPU thread)::

    python benchmarks/detection/bandpass_study.py mri_t1_2d [--threads 1] [--bands plain hp0-2 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build import load_cases  # noqa: E402
from evaluate import permutations  # noqa: E402
from perturb import perturb, settings  # noqa: E402

from memscan.scoring import align_and_correlate  # noqa: E402

#: band name -> (σ of the kept blur, σ of the subtracted blur), in pixels of the 2×-downsampled image; (0, 0) = plain
BANDS = {"plain": (0.0, 0.0), "hp0-2": (0.0, 2.0), "dog0.5-3": (0.5, 3.0), "dog1-4": (1.0, 4.0)}
#: mixes of per-band scores (each band aligned on its own)
MIXES = {"mean plain+hp0-2": {"plain": 0.5, "hp0-2": 0.5}, "2:1 plain+hp0-2": {"plain": 2 / 3, "hp0-2": 1 / 3}}


def _down(x: np.ndarray, f: int = 2) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, np.float32))
    return (F.avg_pool2d(t, f) if t.ndim == 4 else F.avg_pool3d(t, (1, f, f))).numpy()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along the last two (in-plane) axes, edge-replicating."""
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    t = torch.as_tensor(x)
    c, nd = t.shape[1], t.ndim - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in (-1, -2):
        shape = [1] * (nd + 2)
        shape[axis] = len(k)
        pad = [0] * (2 * nd)
        pad[2 * (-axis - 1)], pad[2 * (-axis - 1) + 1] = r, r
        t = conv(F.pad(t, pad, mode="replicate"), k.view(shape).repeat(c, *([1] * (nd + 1))), groups=c)
    return t.numpy()


def _band(x: np.ndarray, band: str) -> np.ndarray:
    keep, remove = BANDS[band]
    return x if (keep, remove) == (0.0, 0.0) else _blur(x, keep) - _blur(x, remove)


def _best_aligned(query: np.ndarray, reference: np.ndarray, band: str) -> np.ndarray:
    q, r = _band(query, band), _band(reference, band)
    every = np.tile(np.arange(len(r)), (len(q), 1))
    return align_and_correlate(q, r, every, flip_axes=(-1,)).score


def _row(name: str, tau: float, by_family: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    def cell(y: np.ndarray, s: np.ndarray) -> str:
        return f"{roc_auc_score(y, s):.3f} / {(s[y == 1] > tau).mean():.2f} / {(s[y == 0] > tau).mean():.2f}"

    y = np.concatenate([v[0] for v in by_family.values()])
    s = np.concatenate([v[1] for v in by_family.values()])
    return f"| {name} (τ {tau:.3f}) | " + " | ".join(cell(*by_family[f]) for f in sorted(by_family)) + \
        f" | {cell(y, s)} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", help="mri_t1_2d, ct_2d, cxr_2d or mri_t1_3d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bands", nargs="+", default=list(BANDS), choices=list(BANDS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/memscan_detection"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    groups = load_cases(args.cache)[args.case]["groups"]
    train, val, unseen = permutations(sorted(groups), 1)[0]
    sets = settings(None)
    ref, cal = _down(groups[train]), _down(groups[val])
    synth = {(subj, f, st): _down(perturb(groups[subj], f, st, seed=7 * k))
             for subj in (train, unseen) for k, (f, st) in enumerate(sets)}
    families = sorted({f for f, _ in sets})
    print(f"{args.case}: train {train}, val {val}, unseen {unseen}; cells AUROC / recall at τ / FPR at τ")
    print("| band | " + " | ".join(families) + " | overall |")
    print("|---" * (len(families) + 2) + "|")
    null, scores = {}, {}
    for band in args.bands:
        t0 = time.time()
        null[band] = _best_aligned(ref, cal, band)
        scores[band] = {key: _best_aligned(imgs, ref, band) for key, imgs in synth.items()}
        print(_row(f"{band}, {time.time() - t0:.0f} s", float(np.percentile(null[band], 95)),
                   _by_family(scores[band], sets, families, train, unseen)), flush=True)
    for name, weights in MIXES.items():
        if all(b in scores for b in weights):
            mixed = {key: sum(w * scores[b][key] for b, w in weights.items()) for key in synth}
            tau = float(np.percentile(sum(w * null[b] for b, w in weights.items()), 95))
            print(_row(name, tau, _by_family(mixed, sets, families, train, unseen)), flush=True)
    return 0


def _by_family(scores: dict, sets: list, families: list[str], train: str, unseen: str) -> dict:
    out = {}
    for f in families:
        y, s = [], []
        for ff, st in sets:
            if ff == f:
                for label, subj in ((1, train), (0, unseen)):
                    v = scores[(subj, ff, st)]
                    s.append(v)
                    y.append(np.full(len(v), label))
        out[f] = (np.concatenate(y), np.concatenate(s))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
