"""Lever study: training length of memscan's default encoder (issue 6).

Question: the CPU-sized encoders of the benchmark train for 150 steps and end close to collapse (positive and
negative similarities both near 1). Does training the default recipe longer separate copies from novel images
better? Same cases, perturbations, seeds and subject permutations as ``run.py``; only the recipe's ``steps``
differ. Prints AUROC / recall at τ / FPR at τ per family (mean over permutations) for the recipe at 150 steps and
at each ``--steps`` value.

Usage (2 CPU cores: ≈ 6 min per 600-step encoder in 2D, three encoders per case for the 6 permutations)::

    python benchmarks/detection/training_length_study.py --cases mri_t1_2d,mri_t1_3d --steps 600 \\
        [--baseline-scores /tmp/memscan_detection/scores.pkl]

``--baseline-scores`` takes the 150-step fused scores (``memscan_default``, or ``memscan_fused`` once the default
score is another) from a ``run.py`` cache of the same code instead of training those encoders again.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build import study_cases, study_parser  # noqa: E402
from evaluate import score_case, summarize  # noqa: E402
from presets import DEFAULT_SCORE, MEMSCAN_SCORES  # noqa: E402
from run import PERMUTATIONS  # noqa: E402


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--steps", default="600", help="comma-separated training lengths to compare with 150")
    parser.add_argument("--baseline-scores", type=Path, default=None, help="run.py's scores.pkl (same code)")
    args = parser.parse_args()
    cases = study_cases(args)
    fused = MEMSCAN_SCORES["fused"]  # the default score when this study ran (detection_training_length.md)
    base_steps = fused["encoder"]["steps"]
    recipes = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        recipes[f"default_{steps}"] = copy.deepcopy(fused)
        recipes[f"default_{steps}"]["encoder"]["steps"] = steps
    cached = pd.read_pickle(args.baseline_scores)["scores"] if args.baseline_scores else None
    if cached is None:
        recipes = {f"default_{base_steps}": copy.deepcopy(fused), **recipes}
    for name in args.cases.split(","):
        t0 = time.time()
        scores = score_case(cases[name], recipes, PERMUTATIONS.get(name, 3))
        if cached is not None:
            fused_name = "memscan_default" if DEFAULT_SCORE == "fused" else "memscan_fused"
            base = cached[name][cached[name]["detector"] == fused_name].copy()
            base["detector"] = f"default_{base_steps}"
            scores = pd.concat([base, scores], ignore_index=True)
        table = summarize(scores).pivot_table(index="family", columns="detector", values=["auroc", "recall", "fpr"])
        print(f"== {name}: {scores['perm'].nunique()} permutations, {time.time() - t0:.0f} s")
        print(table.round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()
