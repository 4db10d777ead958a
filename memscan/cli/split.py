"""``memscan split``: one folder -> patient-disjoint training and validation manifests, reproducibly."""

from __future__ import annotations

import argparse
from typing import Any

from memscan.errors import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan split`` on the top-level subparsers."""
    from memscan.cli.check import add_data_arguments

    parser = subparsers.add_parser(
        "split",
        help="split one image set into patient-disjoint train.csv / val.csv manifests",
        description="Validate every image of SRC, then put a fraction of the subjects (patients) into validation "
        "and the rest into training; no patient is in both. Same seed, same split.",
    )
    parser.add_argument("source", metavar="SRC", help="images (folder, CSV manifest, NIH or MRNet root)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of subjects for validation (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--split", default=None, help="official split of the source to use (NIH/MRNet)")
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for train.csv, val.csv (and skipped.csv)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load SRC, :func:`memscan.data.split_by_subject`, write the two manifests atomically."""
    from pathlib import Path

    from memscan.data import load_image_set, split_by_subject
    from memscan.io import write_csv_atomic
    from memscan.data.discovery import records_to_manifest

    images = load_image_set(
        args.source, "all", layout=args.layout, subject_regex=args.subject_regex, plane=args.plane,
        split=args.split, strict=args.strict, spatial_dims=args.spatial_dims,
    )
    train, val = split_by_subject(images.records, args.val_fraction, args.seed)
    out = Path(args.out)
    write_csv_atomic(records_to_manifest(train), out / "train.csv")
    write_csv_atomic(records_to_manifest(val), out / "val.csv")
    n_subj = lambda rs: len({r["subject_id"] for r in rs})  # noqa: E731
    print(f"train: {len(train)} image(s) of {n_subj(train)} subject(s) -> {out / 'train.csv'}")
    print(f"val:   {len(val)} image(s) of {n_subj(val)} subject(s) -> {out / 'val.csv'}")
    if len(images.skipped):
        write_csv_atomic(images.skipped, out / "skipped.csv")
        print(f"skipped: {len(images.skipped)} file(s) -> {out / 'skipped.csv'}")
    return EXIT_OK
