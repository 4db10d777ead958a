"""``memscan train``: train the self-supervised encoder by running the bundle's train.json."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan train`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train the NT-Xent encoder on the generative model's training images",
        description="Train a self-supervised encoder (SimCLR / NT-Xent, Dar et al.) with the MONAI bundle "
        "bundles/memscan_cxr_2d (--dims 2) or bundles/memscan_knee_3d (--dims 3). Writes RUN/model.pt (best by "
        "validation loss), RUN/checkpoint_epoch=N.pt, RUN/encoder.json and TensorBoard logs in RUN/logs. "
        "Rerunning with the same --out resumes from the last completed epoch.",
    )
    parser.add_argument("--train", required=True, metavar="T", help="training images: folder or CSV manifest")
    parser.add_argument("--val", required=True, metavar="V", help="held-out real images for validation loss")
    parser.add_argument("--dims", type=int, choices=(2, 3), required=True, help="2D (chest X-ray) or 3D (knee MRI)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder (checkpoints, logs)")
    parser.add_argument("--preset", default="default", choices=("default", "paper"),
                        help="default (memscan) or paper (Dar et al. exactly)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                        help="input size after preprocessing (one int, or one per axis)")
    parser.add_argument("--arch", default=None, help="encoder: resnet10/18/34/50/101/152 or densenet121")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--workers", type=int, default=None, help="data-loading worker processes")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Call :func:`memscan.training.train_encoder` and print the best checkpoint's path."""
    from memscan.metrics import resolve_device
    from memscan.training import check_batch_size, train_encoder

    overrides: dict[str, Any] = {}
    if args.device != "auto":
        overrides["device"] = f"$torch.device({str(resolve_device(args.device))!r})"
    for key, value in (("arch", args.arch), ("batch_size", args.batch_size), ("num_workers", args.workers)):
        if value is not None:
            overrides[key] = value
    if args.batch_size is not None:  # before any image is read
        check_batch_size(args.batch_size, "--batch-size")
    image_size = None
    if args.image_size is not None:
        image_size = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size)
    best = train_encoder(
        args.train,
        args.val,
        spatial_dims=args.dims,
        out_dir=args.out,
        preset=args.preset,
        epochs=args.epochs,
        image_size=image_size,
        overrides=overrides,
    )
    print(best)
    return 0
