"""Benchmark of the audit's score modes: the matching step's time for each ``memscan audit --score``, side by side.

Same sets, same CPU, one run: ``--n`` training, validation and synthetic 2D images (smooth random fields at the
detection benchmark's 64², a tenth of the synthetic set planted as shifted copies), each set with the features the
audit computes for it — the fused features (coarse 16² pixels + a 128-d embedding, here random), the best-of pixels
(``memscan.audit.best_of_pixel_sizes``: 64², and for ``best-of-aligned`` 16² too and the 64² pixels' ranks,
``memscan.audit.RANK_PIXELS``) and the images each score aligns
(``memscan.audit.alignment_size``: 32² for ``aligned``, 64² for ``best-of-aligned``) — then
:func:`memscan.metrics.match` as the audit calls it for each mode (``fused``: plain; ``best-of``:
``best_of=[pixels]``; ``aligned``: ``refine`` = test-time alignment fused with the feature correlation;
``best-of-aligned``: ``refine`` = aligned pixels and the same candidates bent onto their query
(``memscan.audit.ALIGN_DEFORM`` of the dimensionality), ``best_of=[pixels, quarter-size pixels, ranks, fused]``, its
retrieval as deep as ``memscan.audit.ALIGN_SHORTLIST`` says; the same without the bent candidates, its rigid
parts, for the bent part's cost; the same aligning only the fused features' first 5 candidates, round 23's, for the
shortlist's cost (2D: 3D has no shortlist); where the fit climbs by L-BFGS (3D since round 26, 2D since 27), the
same fitted by Adam, the earlier optimizer, for L-BFGS's cost; and where the fit also bends band-passed candidates
(2D since round 28), the same bending only the rigid alignment's first ones, for their cost).
``--dims 3`` does the same with 32³ volumes (the grid the audit matches a knee MRI on), 8³ fused pixels and a 32-d
embedding. Modes are interleaved over ``--repeats`` rounds and each reports its best run; the ratio is against
``fused``. Embedding time is the same for every mode (one pass, :func:`memscan.embed.embed_mirrored`) and is not
included.

Usage::

    nice python benchmarks/bench_scores.py [--n 1000] [--repeats 2] [--threads 2] [--out docs/benchmarks/scores.txt]
    nice python benchmarks/bench_scores.py --dims 3 --n 60 --repeats 1 --out docs/benchmarks/scores_3d.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memscan.audit import (ALIGN_CANDIDATES, ALIGN_DEFORM, ALIGN_SHORTLIST, alignment_size, best_of_pixel_sizes,
                           _aligned_refine, _pixel_sets, _retrieval_depth, _score_align_axes)
from memscan.metrics import match
from memscan.scoring import pixel_features, standardize_rows


#: the images' spatial shape per dimensionality: the detection benchmark's 64², and in 3D the audit's pixel grid
#: (``memscan.audit.best_of_pixel_size``: a knee MRI's 32 × 256 × 256 is matched at 32³)
SHAPES = {2: (64, 64), 3: (32, 32, 32)}
#: the embedding size per dimensionality (memscan's 2D and 3D encoders)
EMBEDDING_DIMS = {2: 128, 3: 32}


def smooth_fields(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``[n, 1, *shape]`` random fields (2D or 3D) blurred to a few blobs, in [0, 1]."""
    dims = len(shape)
    x = torch.as_tensor(rng.normal(size=(n, 1, *shape)), dtype=torch.float32)
    k = torch.ones(1, 1, *[9] * dims) / 9.0 ** dims
    conv = F.conv2d if dims == 2 else F.conv3d
    for _ in range(3):
        x = conv(F.pad(x, (4,) * (2 * dims), mode="reflect"), k)
    axes = tuple(range(2, 2 + dims))
    x = x - x.amin(dim=axes, keepdim=True)
    return (x / x.amax(dim=axes, keepdim=True).clamp_min(1e-6)).numpy()


def build(n: int, dims: int = 2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Images and per-mode features of the three sets."""
    rng = np.random.default_rng(seed)
    shape, d = SHAPES[dims], EMBEDDING_DIMS[dims]
    images = {name: smooth_fields(n, shape, rng) for name in ("train", "val", "synthetic")}
    k = max(1, n // 10)
    images["synthetic"][:k] = np.roll(images["train"][:k], shift=(3, -2), axis=(-2, -1))  # planted shifted copies
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, img in images.items():
        emb = rng.normal(size=(n, d)).astype(np.float32)
        if name == "synthetic":
            emb[:k] = out["train"]["embedding"][:k] + 0.1 * rng.normal(size=(k, d)).astype(np.float32)
        coarse = pixel_features(img, [s // 4 for s in shape])  # the fused score's pixels: a quarter per axis
        fused = np.concatenate([standardize_rows(coarse), 2.0 * standardize_rows(emb)], 1)
        out[name] = {"embedding": emb, "fused": standardize_rows(fused), "image": img}
    return out


#: a mode's variants measured beside it: best-of-aligned without its non-rigid fit (its four rigid parts), and
#: best-of-aligned aligning only the fused features' first candidates (no ``memscan.audit.ALIGN_SHORTLIST``, round 23),
#: and best-of-aligned whose non-rigid fit climbs by Adam as it last did (where the audit's climbs by L-BFGS)
RIGID = "best-of-aligned, rigid"
FIRST = "best-of-aligned, first 5"
ADAM = "best-of-aligned, Adam fit"
#: best-of-aligned bending only the rigid alignment's first candidates, without the band-passed ones
#: (``band_k`` of ``memscan.audit.ALIGN_DEFORM``, 2D since round 28), for their cost
NO_BAND = "best-of-aligned, rigid-ranked bends"
#: the ``ADAM`` variant's fit settings over the audit's, per dimensionality: 2D round 26's fit (≤ 3 px, σ 4 then 2,
#: 60 Adam steps each), 3D round 25's (the audit's reach and stages, Adam's step 0.3)
ADAM_FIT = {2: {"max_displacement": 3.0, "fit_highpass": (4.0, 2.0), "iterations": 60, "optimizer": "adam",
                "learning_rate": 0.15, "max_step": None},
            3: {"optimizer": "adam", "learning_rate": 0.3}}


def _fits_by_lbfgs(dims: int) -> bool:
    """Whether the audit's non-rigid fit in ``dims`` dimensions climbs by L-BFGS."""
    return (ALIGN_DEFORM[dims] or {}).get("optimizer") == "lbfgs"


def run_mode(mode: str, sets: dict[str, dict[str, np.ndarray]]) -> tuple[float, dict]:
    """One audit-style match for ``mode``: (seconds, summary)."""
    variant = mode if mode in (RIGID, FIRST, ADAM, NO_BAND) else None
    if variant:
        mode = "best-of-aligned"
    feats = [sets[k]["fused"] for k in ("train", "val", "synthetic")]
    # the audit's pixel sets for this mode (best_of_pixel_sizes: 64², and for best-of-aligned 16² and the 64² ranks)
    sizes = best_of_pixel_sizes(sets["train"]["image"].shape[2:], mode)
    pixels = list(zip(*(_pixel_sets([pixel_features(sets[k]["image"], size) for size in sizes], mode)
                        for k in ("train", "val", "synthetic"))))
    size = alignment_size(sets["train"]["image"].shape[2:], mode)
    images = {k: pixel_features(sets[k]["image"], size).reshape(-1, 1, *size) for k in ("train", "val", "synthetic")}
    axes = {"flip_axes": (-1,), "plane": (-2, -1)}
    kwargs: dict = {}
    if mode == "best-of":
        kwargs = {"best_of": pixels}
    elif mode == "aligned":
        kwargs = {"refine": _aligned_refine(images, axes), "refine_k": ALIGN_CANDIDATES}
    elif mode == "best-of-aligned":
        align_axes = _score_align_axes(mode, axes, spatial_dims=sets["train"]["image"].ndim - 2)
        if variant == RIGID:
            align_axes.pop("deform")
        if variant == FIRST:
            align_axes.pop("shortlist", None)
        if variant == ADAM:
            align_axes["deform"] = {**align_axes["deform"], **ADAM_FIT[sets["train"]["image"].ndim - 2]}
        if variant == NO_BAND:
            align_axes["deform"] = {**align_axes["deform"], "band_k": 0}
        kwargs = {"refine": _aligned_refine(images, align_axes),
                  "refine_k": _retrieval_depth(align_axes), "best_of": [*pixels, tuple(feats)]}
    t0 = time.perf_counter()
    res = match(*feats, device="cpu", n_bootstrap=200, seed=0, **kwargs)
    return time.perf_counter() - t0, res.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images per set")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images (64²) or 3D volumes (32³)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = build(args.n, args.dims)
    # "first 5" is the default itself where the audit has no shortlist (3D)
    modes = ("fused", "best-of", "aligned", "best-of-aligned", RIGID) + (FIRST,) * bool(ALIGN_SHORTLIST[args.dims]) + \
        (ADAM,) * _fits_by_lbfgs(args.dims) + (NO_BAND,) * bool((ALIGN_DEFORM[args.dims] or {}).get("band_k"))
    best: dict[str, float] = {}
    summaries: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved, so load from other jobs spreads over every mode
            seconds, summaries[mode] = run_mode(mode, sets)
            best[mode] = min(best.get(mode, np.inf), seconds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["memscan score-mode benchmark (benchmarks/bench_scores.py)",
             f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{args.threads} threads; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load {load:.2f}",
             f"match() as the audit calls it, {args.n} training, validation and synthetic "
             f"{'×'.join(map(str, SHAPES[args.dims]))} images each "
             f"({args.n // 10} planted shifted copies), 200 bootstrap draws, best of {args.repeats} interleaved runs:"]
    for mode in modes:
        s = summaries[mode]
        lines.append(f"  --score {mode:<35} {best[mode]:8.2f} s  {best[mode] / best['fused']:7.1f}× fused   "
                     f"τ {s['threshold']:.4f}, copies {s['n_copies_synthetic']}/{args.n}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
