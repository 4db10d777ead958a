"""``memscan check``: preflight of training, validation and synthetic sets before spending GPU hours."""

from __future__ import annotations

import argparse
from typing import Any

from memscan.errors import EXIT_BAD_INPUT, EXIT_OK

__all__ = ["add_parser", "run", "add_data_arguments"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by commands that read image sets (layout, subjects, MRNet plane, strictness)."""
    parser.add_argument("--layout", default="auto", choices=("auto", "folder", "manifest", "nih", "mrnet"),
                        help="layout of the training/validation sources (default: detect)")
    parser.add_argument("--subject-regex", metavar="R", default=None,
                        help="regex with a group (or (?P<subject>...)) capturing the patient id from the path")
    parser.add_argument("--plane", default="sagittal", choices=("axial", "coronal", "sagittal"),
                        help="MRNet plane (default sagittal)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None,
                        help="expected dimensionality (default: the majority of each set)")
    parser.add_argument("--strict", action="store_true", help="any unusable file is an error (exit 2)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan check`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "check",
        help="preflight: count, validate and cross-check the image sets",
        description="Open every image once and report per set: count, 2D/3D, shapes, spacings, subjects, skipped "
        "files and why; warn when training and validation share patients or identical images. "
        "Exit 0 when usable, 2 when not.",
    )
    parser.add_argument("--train", required=True, metavar="T", help="training images (folder, CSV, NIH or MRNet root)")
    parser.add_argument("--val", required=True, metavar="V", help="validation images: held-out real, other patients")
    parser.add_argument("--synthetic", action="append", default=[], metavar="S",
                        help="synthetic images (repeat for several sets)")
    parser.add_argument("--train-split", default=None, help="official split of the training source "
                        "(NIH: train_val|test, MRNet: train|valid)")
    parser.add_argument("--val-split", default=None, help="official split of the validation source")
    add_data_arguments(parser)
    parser.add_argument("--out", metavar="DIR", default=None, help="write DIR/skipped.csv and DIR/check.json")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run :func:`memscan.data.check_sources`, print the report, write skipped.csv when ``--out`` is given."""
    from pathlib import Path

    from memscan.data.check import check_sources
    from memscan.io import write_json_atomic

    report = check_sources(
        args.train, args.val, args.synthetic, layout=args.layout, subject_regex=args.subject_regex,
        plane=args.plane, train_split=args.train_split, val_split=args.val_split, strict=args.strict,
        spatial_dims=args.spatial_dims,
    )
    print(report.to_text())
    if args.out:
        out = Path(args.out)
        path = report.write_skipped(out)
        write_json_atomic(out / "check.json", report.summary())
        print(f"wrote {path} ({len(report.skipped)} row(s)) and {out / 'check.json'}")
    return EXIT_OK if report.usable else EXIT_BAD_INPUT
