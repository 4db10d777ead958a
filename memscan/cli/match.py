"""``memscan match``: the memorization test on embeddings the user already has (.npy / .npz / .pt)."""

from __future__ import annotations

import argparse
from typing import Any

from memscan.errors import EXIT_OK, InputError

__all__ = ["add_parser", "run", "format_summary"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan match`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "match",
        help="threshold and copies from train / validation / synthetic embeddings",
        description="Calibrate τ on train→validation correlations and flag memorized training samples and "
        "synthetic copies (Dar et al.). Writes OUT/summary.json, OUT/train_matches.csv, OUT/synthetic_matches.csv.",
    )
    parser.add_argument("--train-emb", required=True, metavar="T", help="training embeddings (.npy, .npz, .pt)")
    parser.add_argument("--val-emb", required=True, metavar="V",
                        help="validation embeddings: held-out real images of other patients")
    parser.add_argument("--synthetic-emb", required=True, metavar="S", help="synthetic embeddings")
    parser.add_argument("--train-subjects", metavar="FILE",
                        help="subject id of each training row (.txt one per line, or .csv with a 'subject' column)")
    parser.add_argument("--val-subjects", metavar="FILE",
                        help="subject id of each validation row; with --train-subjects, same-subject pairs are "
                        "excluded from calibration, and the null-rate split keeps patients apart")
    parser.add_argument("--train-ids", metavar="FILE",
                        help="a name per training row for the tables (.txt, or .csv with an 'image' column, e.g. "
                        "an audit's embeddings/train.files.csv)")
    parser.add_argument("--synthetic-ids", metavar="FILE", help="a name per synthetic row for the tables")
    parser.add_argument("--best-of", nargs=3, action="append", default=None, metavar=("T2", "V2", "S2"),
                        help="other features of the same images (e.g. an audit's embeddings/*_pixels.npy): each "
                        "pair is scored by the better of the feature sets, each rescaled by its own threshold, as "
                        "'memscan audit --score best-of' does; repeatable")
    parser.add_argument("--percentile", type=float, default=95.0, help="τ percentile (default 95)")
    parser.add_argument("--headroom", type=float, default=0.0, metavar="H",
                        help="flag copies above τ + H·(1 − τ), H in [0, 1) (default 0, the paper's rule)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap draws for the 95%% intervals (0 = none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the null split")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.set_defaults(run=run)
    return parser


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _ci(interval: list[float] | None, percent: bool = True) -> str:
    if not interval:
        return ""
    lo, hi = interval
    return f" (95% CI {_pct(lo)}–{_pct(hi)})" if percent else f" (95% CI {lo:.4f}–{hi:.4f})"


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
    """Four-line human summary of a match result."""
    from memscan.report.tables import threshold_rule

    s = summary
    return "\n".join([
        f"τ = {s['threshold']:.4f}{_ci(s['threshold_ci95'], percent=False)}: {threshold_rule(s)} of "
        f"the best validation {'best-of score' if s.get('feature_set_thresholds') else 'correlation'} of "
        f"{s['n_train']} training samples ({s['n_val']} validation)",
        f"memorized training samples: {s['n_memorized_train']}/{s['n_train']} = "
        f"{_pct(s['frac_memorized_train'])}{_ci(s['frac_memorized_train_ci95'])}",
        f"synthetic copies: {s['n_copies_synthetic']}/{s['n_synthetic']} = "
        f"{_pct(s['frac_copies_synthetic'])}{_ci(s['frac_copies_synthetic_ci95'])}",
        f"null check: τ from half the validation set flags {_pct(s['null_rate'])} of training samples against "
        f"the other half (expected ≈{_pct(s['null_rate_expected'])}); results in {out_dir}",
    ])


def run(args: argparse.Namespace) -> int:
    """Load the three embedding files, run :func:`memscan.metrics.match`, write and print the results."""
    from memscan.metrics import load_embedding_sets, load_labels, match  # torch loads only when the command runs

    train, val, synthetic = load_embedding_sets(args.train_emb, args.val_emb, args.synthetic_emb)
    subjects, names = ("subject", "subject_id", "patient_id"), ("image", "id", "file", "path", "name")
    labels = {key: (None if getattr(args, key) is None else load_labels(getattr(args, key), len(rows), columns))
              for key, rows, columns in [("train_subjects", train, subjects), ("val_subjects", val, subjects),
                                         ("train_ids", train, names), ("synthetic_ids", synthetic, names)]}
    best_of = []
    for paths in args.best_of or []:  # rows must be the same images as the main sets', in order
        best_of.append(load_embedding_sets(*paths))
        for path, arr, main_arr, flag in zip(paths, best_of[-1], (train, val, synthetic),
                                             ("train", "val", "synthetic")):
            if len(arr) != len(main_arr):
                raise InputError(path, f"has {len(arr)} rows but --{flag}-emb has {len(main_arr)}: --best-of needs "
                                       "features of the same images in the same order")
    result = match(train, val, synthetic, percentile=args.percentile, headroom=args.headroom, device=args.device,
                   n_bootstrap=args.bootstrap, seed=args.seed, best_of=best_of or None, **labels)
    result.to_dir(args.out)
    print(format_summary(result.summary, args.out))
    return EXIT_OK
