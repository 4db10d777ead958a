"""Compare one detector between two ``run.py`` runs (e.g. before and after a change to memscan's default).

``run.py`` keeps every score of a run in ``--cache``/``scores.pkl``; two runs with the same seeds and cached encoders
differ only by the code that changed between them. This prints, per case and family, the detector's AUROC /
recall at τ / FPR at τ in each run side by side (means over permutations, as in detection.md)::

    python benchmarks/detection/compare_runs.py BEFORE/scores.pkl AFTER/scores.pkl --detector memscan_default \\
        --names grid,refined
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import summarize  # noqa: E402
from run import _table  # noqa: E402

__all__ = ["compare"]


def compare(before: dict[str, pd.DataFrame], after: dict[str, pd.DataFrame], detector: str,
            names: tuple[str, str] = ("before", "after")) -> str:
    """Markdown: for every case in both runs, one table of ``detector``'s metrics in each run.

    Args:
        before, after: ``run.py``'s scores per case (``scores.pkl``'s ``"scores"``).
        detector: the detector to compare.
        names: column labels of the two runs.

    Raises:
        ValueError: no case holds the detector in both runs.
    """
    out = []
    for case in [c for c in before if c in after]:
        runs = [sc[sc["detector"] == detector].assign(detector=name) for sc, name in
                ((before[case], names[0]), (after[case], names[1]))]
        if any(r.empty for r in runs):
            continue
        out += [f"#### {case}", "", _table(summarize(pd.concat(runs, ignore_index=True)), list(names)), ""]
    if not out:
        raise ValueError(f"no case holds {detector!r} in both runs")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="the first run's scores.pkl")
    parser.add_argument("after", type=Path, help="the second run's scores.pkl")
    parser.add_argument("--detector", default="memscan_default")
    parser.add_argument("--names", default="before,after", help="two comma-separated column labels")
    args = parser.parse_args(argv)
    names = tuple(args.names.split(","))
    if len(names) != 2:
        parser.error("--names takes two labels")
    try:
        runs = [pd.read_pickle(p)["scores"] for p in (args.before, args.after)]
        print(compare(*runs, args.detector, names))
    except (OSError, KeyError, ValueError) as exc:
        print(f"compare_runs.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
