"""Lever studies on candidate detectors (issue 6): ``presets.CANDIDATES`` beside pixel Pearson and memscan's default.

Same cases, perturbations, seeds and subject permutations as ``run.py``; encoders are trained once per training
subject and shared by every candidate with the same encoder settings. Prints markdown: AUROC / recall at τ / FPR at τ
per family (mean over permutations, as in detection.md) and the pooled FPR at τ per permutation.

Studies run with it (docs/benchmarks/detection_candidates.md):

* ``memscan_best_of`` (= ``memscan audit --score best-of``) and ``best_of_spread``: per query, the better of pixel
  Pearson and the fused score, each first put on a scale anchored at its own null (``evaluate.null_normalized``);
  τ of the combination is the 95th percentile of the same combination of each training image's best validation
  scores. ``best_of_aligned``: the same with the fused score after test-time alignment (``--score aligned``).
  ``best_of_three`` (round 8's ``memscan audit --score best-of-aligned``): the best of pixel Pearson, the fused score
  and the aligned pixels alone of the fused features' 5 best candidates (``aligned_pixels``), each scaled by its own
  null; ``best_of_three_hp*`` high-pass those aligned pixels (``_s1`` was round 9's ``--score
  best-of-aligned``, ``_f1`` aligns at the full size and was round 10's); ``best_of_four_hp_f1_px4`` adds pixel
  Pearson at a quarter size and is today's.
* ``*_centered``: Pearson of the features minus the training set's mean feature vector (``center`` = the share
  subtracted), which removes the component every image of the anatomy shares.
* ``memscan_default_v2t``: τ from each validation image's best training score instead.

``--seeds 0,1,2`` repeats the whole study per seed (the seed draws the perturbations and initialises every encoder
and its views) and prints, per family, each detector's AUROC as mean ± standard deviation over the seeds (each seed
itself a mean over permutations), the worst seed's AUROC, overall recall / FPR at τ (95th percentile) and at each
stricter operating point (``evaluate.operating_points``: the 99th and 100th percentile of the same null, τ raised by
a headroom of 0.25 and 0.5 as ``memscan audit --headroom`` does), the FPR at an oracle τ read off the copies for
recall 0.95 (``evaluate.fpr_at_recall``: what the ranking allows if τ were calibrated perfectly), and recall / FPR
per family at headroom 0.5. ``--paper`` adds the paper's recipe as a column; each seed's scores are kept in
``--cache``, and ``--from-scores`` tabulates them again without recomputing. One seed keeps the single-run tables
above.

Usage (2 CPU cores; about 6 min per MRI case)::

    python benchmarks/detection/candidate_study.py --cases mri_t1_2d,mri_t1_3d,ct_2d,cxr_2d \\
        --candidates memscan_best_of,best_of_spread
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build import study_cases, study_parser  # noqa: E402
from evaluate import (HEADROOMS, fpr_at_recall, headroom_label, operating_points, rates_table,  # noqa: E402
                      score_case, seed_table, summarize)
from presets import CANDIDATES, DEFAULT, PAPER, PIXEL  # noqa: E402
from run import PERMUTATIONS, _table  # noqa: E402


def perm_names(scores) -> list[str]:
    """``train/val/unseen`` of each permutation, in order."""
    first = scores.drop_duplicates("perm").sort_values("perm")
    return [f"{a} / {b} / {c}" for a, b, c in zip(first["train"], first["val"], first["unseen"])]


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--candidates", default="memscan_best_of,best_of_spread",
                        help="comma-separated names of presets.CANDIDATES")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; more than one prints mean ± sd")
    parser.add_argument("--paper", action="store_true", help="add the paper's recipe as a column")
    parser.add_argument("--from-scores", action="store_true",
                        help="with --seeds: tabulate the scores an earlier run kept in --cache, computing nothing")
    args = parser.parse_args()
    cases = study_cases(args)
    recipes = {"pixel": PIXEL, **({"paper": PAPER} if args.paper else {}), "memscan_default": DEFAULT,
               **{c: CANDIDATES[c] for c in args.candidates.split(",")}}
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.cases.split(","):
        t0 = time.time()
        if len(seeds) > 1:
            summaries, points, oracle = {}, {}, {}
            for seed in seeds:
                path = args.cache / f"seed_scores_{name}_{seed}.csv.gz"  # each seed kept: a cut run still reports
                if args.from_scores:
                    scores = pd.read_csv(path)
                else:
                    scores = score_case(cases[name], recipes, args.permutations or PERMUTATIONS.get(name, 3),
                                        seed=seed, log=lambda m: print(m, file=sys.stderr))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    scores.to_csv(path, index=False)
                summaries[seed] = summarize(scores)
                for label, at in operating_points(scores).items():
                    points.setdefault(label, {})[seed] = summarize(at)
                oracle[seed] = fpr_at_recall(scores)
                print(f"  {name} seed {seed} done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            names = [d for d in recipes if d in set(scores["detector"])]
            print(f"### {name} ({scores['perm'].nunique()} permutations × seeds {args.seeds}"
                  + ("" if args.from_scores else f", {time.time() - t0:.0f} s") + ")\n")
            print(seed_table(summaries, names, points, oracle) + "\n")
            strict = headroom_label(HEADROOMS[-1])
            print(f"Recall / FPR per family at {strict} (``--headroom {HEADROOMS[-1]:g}``), mean over seeds:\n")
            print(rates_table(points[strict], names) + "\n", flush=True)
            continue
        scores = score_case(cases[name], recipes, args.permutations or PERMUTATIONS.get(name, 3),
                            log=lambda m: print(m, file=sys.stderr))
        summary = summarize(scores)
        names = list(recipes)
        print(f"### {name} ({scores['perm'].nunique()} permutations, {time.time() - t0:.0f} s)\n")
        print(_table(summary, names) + "\n")
        fpr = {d: [float((g.score[g.label == 0] > g.tau.iloc[0]).mean()) for _, g in sc.groupby("perm")]
               for d, sc in scores.groupby("detector")}
        print("Pooled FPR at τ per permutation (train / val / unseen):\n")
        print("| train / val / unseen | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for k, order in enumerate(perm_names(scores)):
            print(f"| {order} | " + " | ".join(f"{fpr[d][k]:.2f}" for d in names) + " |")
        print(flush=True)


if __name__ == "__main__":
    main()
