"""``memscan demo``: the whole audit on the embedded real demo data, with planted copies it must find.

Thin front door to :func:`memscan.audit.run_demo`: builds a synthetic set from perturbed copies of training images
plus images of a subject the model never saw, trains a small encoder, audits, and prints where the report is, how
many planted copies were caught and how many unseen images were wrongly flagged.
"""

from __future__ import annotations

import argparse
from typing import Any

from memscan.errors import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan demo`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="run the full audit on the embedded demo data (planted copies + an unseen subject)",
        description="Audit a synthetic set made of perturbed copies of real training images and images of an "
        "unseen subject: trains a small encoder (about two minutes on two CPU cores), audits, writes the report.",
    )
    parser.add_argument("--out", default="memscan-demo", metavar="DIR",
                        help="demo folder (default ./memscan-demo; a previous demo there is replaced)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2,
                        help="2: axial T1 MRI slices (PNG); 3: T1 MRI slabs (NIfTI)")
    parser.add_argument("--epochs", type=int, default=None, help="encoder training epochs (default: the demo's)")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                        help="encoder input size (default: the demo's)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda")
    parser.add_argument("--controls", type=int, default=8, metavar="N", help="positive controls (default 8)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap draws (default 1000)")
    parser.add_argument("--score", default=None, metavar="MODE",
                        help="similarity score, as for memscan audit (default best-of-aligned)")
    parser.add_argument("--headroom", type=float, default=None, metavar="H",
                        help="flag copies above τ + H·(1 − τ), as for memscan audit (default 0.5 with "
                             "best-of-aligned, 0 with every other score)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    from memscan.audit import DEFAULT_SCORE, run_demo
    from memscan.data.check import MIN_TRAIN_IMAGES

    size = None
    if args.image_size:
        size = args.image_size[0] if len(args.image_size) == 1 else args.image_size
    print(f"memscan demo: {args.dims}D — building a synthetic set with planted copies, training a small encoder "
          f"and auditing (a few minutes on a laptop CPU)…", flush=True)
    result = run_demo(args.out, dims=args.dims, epochs=args.epochs, image_size=size, device=args.device,
                      controls=args.controls, n_bootstrap=args.bootstrap, score=args.score or DEFAULT_SCORE,
                      headroom=args.headroom)
    block = result.audit.summary["synthetic_sets"]["synthetic"]
    controls = result.audit.summary.get("controls") or {}
    n_train = int(block["n_train"])
    if n_train < MIN_TRAIN_IMAGES:  # τ then rests on too few values to promise its rate (the check's warning)
        rate = (f"with {n_train} training images a new image exceeds them all with chance about 1/{n_train + 1}, "
                f"so the threshold cannot promise {100 - block['percentile']:g}%")
    else:
        rate = (f"the threshold's expected false-alarm rate is {'at most ' if block.get('headroom') else ''}about "
                f"{100 - block['percentile']:g}%")
    lines = [
        f"planted copies caught: {result.n_copies_caught} of {result.n_copies_planted}",
        f"unseen-subject images wrongly flagged: {result.n_unseen_flagged} of {result.n_unseen} ({rate})",
        f"τ = {block['threshold']:.4f}; copies flagged in total: {block['n_copies_synthetic']} of "
        f"{block['n_synthetic']}",
    ]
    if controls.get("n"):
        lines.append(f"positive controls caught: {controls.get('n_caught', 0)} of {controls['n']}")
    lines += [
        f"ground truth: {result.inputs.synthetic.parent / 'truth.csv'}",
        f"report: {result.audit.report_path}",
    ]
    print("\n".join(lines))
    return EXIT_OK
